//! Key files and environment values: creation, permissions, round trips, and no secret in
//! any `Debug` output or error message.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chartlog_crypto::{
    DataKey, DataKeyId, EventSigner, KEK_FILE_NAME, KekId, KeyFileError, KeyRing,
    SIGNING_FILE_NAME, SignerKeyId, SigningKeys, load_or_create_key_files,
};

use crate::support::{TempDir, patient_stream};

fn mode(path: &std::path::Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn key_files_are_created_private_once_and_reloaded() {
    let temp = TempDir::new();
    let dir = temp.path().join("keys");
    let (ring, signing) = load_or_create_key_files(&dir).unwrap();
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(KEK_FILE_NAME)), 0o600);
    assert_eq!(mode(&dir.join(SIGNING_FILE_NAME)), 0o600);
    let leftovers: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "no temporary file left: {leftovers:?}");

    let (again_ring, again_signing) = load_or_create_key_files(&dir).unwrap();
    assert_eq!(again_ring.active_kek_id(), ring.active_kek_id());
    assert_eq!(again_signing.active().key_id(), signing.active().key_id());
    assert_eq!(
        again_signing.active().verifying_key_bytes(),
        signing.active().verifying_key_bytes()
    );
    let owner = patient_stream(1);
    let wrapped = ring.wrap(&owner, DataKeyId::generate(), &DataKey::generate());
    again_ring
        .unwrap(&owner, &wrapped)
        .expect("the reloaded KEK is the same");
}

#[test]
fn key_files_readable_by_others_are_refused() {
    let temp = TempDir::new();
    let dir = temp.path().join("keys");
    load_or_create_key_files(&dir).unwrap();
    let kek_path = dir.join(KEK_FILE_NAME);
    fs::set_permissions(&kek_path, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        load_or_create_key_files(&dir),
        Err(KeyFileError::InsecurePermissions { mode: 0o644, .. })
    ));
    fs::set_permissions(&kek_path, fs::Permissions::from_mode(0o600)).unwrap();
    load_or_create_key_files(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    assert!(matches!(
        load_or_create_key_files(&dir),
        Err(KeyFileError::InsecurePermissions { .. })
    ));
}

#[test]
fn rotated_signing_keys_survive_a_save_and_load() {
    let temp = TempDir::new();
    let path = temp.path().join(SIGNING_FILE_NAME);
    let mut keys = SigningKeys::generate(SignerKeyId::parse("signer-1").unwrap());
    let old_public = keys.active().verifying_key_bytes();
    keys.rotate(SignerKeyId::parse("signer-2").unwrap())
        .unwrap();
    keys.save(&path).unwrap();
    assert_eq!(mode(&path), 0o600);
    let loaded = SigningKeys::load(&path).unwrap();
    assert_eq!(loaded.active().key_id().as_str(), "signer-2");
    assert_eq!(
        loaded.active().verifying_key_bytes(),
        keys.active().verifying_key_bytes()
    );
    let retired: Vec<_> = loaded
        .retired()
        .map(|(id, key)| (id.as_str().to_owned(), *key))
        .collect();
    assert_eq!(retired, vec![("signer-1".to_owned(), old_public)]);
    let verifier = loaded.verifier();
    assert_eq!(
        verifier.signer_key_ids(),
        vec![
            SignerKeyId::parse("signer-1").unwrap(),
            SignerKeyId::parse("signer-2").unwrap()
        ]
    );
}

#[test]
fn key_rings_load_from_an_environment_value() {
    let first = [0x11u8; 64];
    let second = [0x22u8; 64];
    let value = format!(
        " kek-a:{} , kek-b:{}",
        BASE64.encode(first),
        BASE64.encode(second)
    );
    let ring = KeyRing::from_env_value(&value).unwrap();
    assert_eq!(ring.active_kek_id().as_str(), "kek-a");
    assert_eq!(ring.kek_ids().len(), 2);
    let mut expected = KeyRing::with_key(KekId::parse("kek-b").unwrap(), second);
    expected.add(KekId::parse("kek-a").unwrap(), first).unwrap();
    let owner = patient_stream(1);
    let wrapped = ring.wrap(&owner, DataKeyId::generate(), &DataKey::generate());
    expected
        .unwrap(&owner, &wrapped)
        .expect("kek-a is the first key");

    let short = BASE64.encode([0x33u8; 63]);
    for bad in [
        String::new(),
        "kek-a".to_owned(),
        format!("kek-a:{short}"),
        format!("kek-a:{}!", BASE64.encode(first)),
        format!(":{}", BASE64.encode(first)),
        format!(
            "kek-a:{},kek-a:{}",
            BASE64.encode(first),
            BASE64.encode(second)
        ),
    ] {
        let error = KeyRing::from_env_value(&bad)
            .expect_err("malformed")
            .to_string();
        for secret in [&BASE64.encode(first), &BASE64.encode(second), &short] {
            assert!(
                !error.contains(&secret[..12]),
                "error quotes a key: {error}"
            );
        }
    }
}

#[test]
fn debug_never_prints_key_bytes() {
    let kek_bytes = [0x5cu8; 64];
    let mut ring = KeyRing::with_key(KekId::parse("kek-a").unwrap(), kek_bytes);
    ring.add_generated(KekId::parse("kek-b").unwrap()).unwrap();
    let printed = format!("{ring:?} {ring:#?}");
    assert!(printed.contains("kek-a"));
    assert!(!printed.contains(&hex::encode(kek_bytes)[..16]));
    assert!(!printed.contains(&BASE64.encode(kek_bytes)[..16]));
    assert!(!printed.contains("92, 92, 92"), "no byte arrays");

    let secret = [0x6du8; 32];
    let signer = EventSigner::from_secret_bytes(SignerKeyId::parse("signer-a").unwrap(), secret);
    let mut keys = SigningKeys::generate(SignerKeyId::parse("signer-b").unwrap());
    keys.rotate(SignerKeyId::parse("signer-c").unwrap())
        .unwrap();
    let printed = format!("{signer:?} {signer:#?} {keys:?} {keys:#?}");
    assert!(printed.contains("signer-a"));
    assert!(!printed.contains(&hex::encode(secret)[..16]));
    assert!(!printed.contains(&BASE64.encode(secret)[..16]));
    assert!(!printed.contains("109, 109, 109"), "no byte arrays");

    let key = DataKey::generate();
    assert_eq!(format!("{key:?}"), "DataKey(<secret>)");
}
