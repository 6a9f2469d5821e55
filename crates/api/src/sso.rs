//! Single sign-on: OpenID Connect ID tokens from the one identity provider the server trusts
//! (`serve --oidc-issuer --oidc-audience --oidc-jwks`).
//!
//! The EHR application signs its user in at the organisation's identity provider and sends the
//! ID token it got to `POST /auth/sso`; the server verifies it here (signature against the
//! provider's published keys, issuer, audience, expiry, age) and opens a session for the
//! account an administrator linked to the token's subject. The provider owns that account's
//! password and second factor: a role that needs a second factor needs the token's `amr` to
//! say one was used. Signing a note takes a fresh ID token in place of the password.
//!
//! Keys come from a JWKS file the operator keeps current (fetched from the provider's
//! `jwks_uri` by whatever deploys the server): the server reads it at start and again, at most
//! once a minute, when a token names a key it does not know, so a provider's key rotation
//! needs no restart. Tokens are accepted once: `verify` gives each the digest of what the
//! provider signed, and the accounts service spends it in the database, so a replay is refused
//! by every server, however its signature is re-encoded.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use chartlog_access::IdentityAssertion;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Signature algorithms accepted: asymmetric only. An HMAC token would be signed with a
/// secret the server shares with the provider, and `none` is no signature at all.
const ALGORITHMS: [Algorithm; 7] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];
/// Clock skew allowed between the provider and this server.
const CLOCK_SKEW_SECONDS: u64 = 60;
/// An ID token older than this does not sign anyone in, whatever its expiry says.
pub const LOGIN_TOKEN_AGE_MAX: Duration = Duration::from_secs(10 * 60);
/// Signing a note needs a token issued this recently: the user has just signed in again.
pub const REAUTHENTICATION_TOKEN_AGE_MAX: Duration = Duration::from_secs(5 * 60);
/// How often an unknown key id may make the server read the key file again.
const KEY_RELOAD_INTERVAL: Duration = Duration::from_secs(60);
/// The longest token looked at; real ID tokens are a few KiB.
const TOKEN_BYTES_MAX: usize = 16 * 1024;
/// The largest key file read.
const JWKS_BYTES_MAX: u64 = 1024 * 1024;

/// `amr` values (RFC 8176) of a possession or inherence factor: with any other method they
/// make two factors.
const SECOND_FACTOR_METHODS: [&str; 12] = [
    "otp", "hwk", "swk", "sc", "sms", "tel", "fpt", "face", "iris", "retina", "vbm", "pop",
];

/// Which identity provider the server trusts.
#[derive(Clone, Debug)]
pub struct SsoSettings {
    /// The provider's issuer identifier, exactly as its tokens' `iss`.
    pub issuer: String,
    /// This server's client id at the provider, as its tokens' `aud`.
    pub audience: String,
    /// The provider's JSON Web Key Set, as a file.
    pub jwks_path: PathBuf,
}

/// Why an identity provider could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SsoSetupError {
    #[error("cannot read the identity provider's key file {}: {source}", .path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the identity provider's key file {} is not a JSON Web Key Set: {reason}", .path.display())]
    Malformed { path: PathBuf, reason: String },
}

/// Why an ID token was refused. Never carries the token or its claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("not a signed JWT, or one too large")]
    Malformed,
    #[error("signed with an algorithm this server does not accept")]
    AlgorithmNotAccepted,
    #[error("signed with a key the identity provider's key file does not hold")]
    UnknownKey,
    #[error("the signature, issuer, audience or validity period does not check out")]
    Invalid,
    #[error("issued too long ago, or in the future")]
    Stale,
    #[error(
        "the token does not show a sign-in at the identity provider within the last 5 minutes \
         (auth_time); ask the provider to sign the user in again (max_age=0 or prompt=login)"
    )]
    NoFreshSignIn,
}

/// What a token is presented for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenUse {
    /// Signing in: a token issued within [`LOGIN_TOKEN_AGE_MAX`].
    Login,
    /// Proving the user is at the keyboard (signing a note): the user must have signed in at
    /// the provider (`auth_time`) within [`REAUTHENTICATION_TOKEN_AGE_MAX`]. A token's `iat`
    /// is not enough: a provider reissues tokens silently (`prompt=none`) on an old sign-in.
    Reauthentication,
}

impl TokenUse {
    fn age_max(self) -> Duration {
        match self {
            TokenUse::Login => LOGIN_TOKEN_AGE_MAX,
            TokenUse::Reauthentication => REAUTHENTICATION_TOKEN_AGE_MAX,
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    iat: i64,
    exp: i64,
    #[serde(default)]
    amr: Vec<String>,
    /// When the user last authenticated at the provider (OpenID Connect Core, 2).
    #[serde(default)]
    auth_time: Option<i64>,
    aud: Audience,
    /// The party the token was issued to, when it has several audiences.
    #[serde(default)]
    azp: Option<String>,
}

/// `aud`: one audience or several (RFC 7519, 4.1.3).
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(#[allow(dead_code)] String),
    Many(Vec<String>),
}

struct Keys {
    set: JwkSet,
    read_at: Instant,
}

/// The identity provider the server trusts, with its keys.
pub struct IdentityProvider {
    settings: SsoSettings,
    keys: RwLock<Keys>,
}

impl std::fmt::Debug for IdentityProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityProvider")
            .field("issuer", &self.settings.issuer)
            .finish_non_exhaustive()
    }
}

impl IdentityProvider {
    /// Reads the provider's key file; refuses one that holds no key.
    pub fn load(settings: SsoSettings) -> Result<Self, SsoSetupError> {
        let set = read_jwks(&settings.jwks_path)?;
        Ok(Self {
            settings,
            keys: RwLock::new(Keys {
                set,
                read_at: Instant::now(),
            }),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.settings.issuer
    }

    /// Verifies an ID token for `token_use` at `now`. The token is not spent here: the
    /// accounts service spends the assertion's digest when it signs the user in.
    pub fn verify(
        &self,
        token: &str,
        now: chartlog_domain::Timestamp,
        token_use: TokenUse,
    ) -> Result<IdentityAssertion, TokenRefusal> {
        let age_max = token_use.age_max();
        // JWT times are whole seconds since the epoch.
        let now_unix = now.unix_micros().div_euclid(1_000_000);
        if token.len() > TOKEN_BYTES_MAX {
            return Err(TokenRefusal::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenRefusal::Malformed)?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(TokenRefusal::AlgorithmNotAccepted);
        }
        let kid = header.kid.ok_or(TokenRefusal::UnknownKey)?;
        let key = self.key(&kid, header.alg)?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = CLOCK_SKEW_SECONDS;
        validation.validate_nbf = true;
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|_| TokenRefusal::Invalid)?
            .claims;
        let skew = CLOCK_SKEW_SECONDS as i64;
        let age_max = i64::try_from(age_max.as_secs()).unwrap_or(i64::MAX);
        if claims.iat > now_unix + skew || claims.iat < now_unix - age_max - skew {
            return Err(TokenRefusal::Stale);
        }
        if claims.sub.is_empty() {
            return Err(TokenRefusal::Invalid);
        }
        // OpenID Connect Core 3.1.3.7: a token for several audiences names the party it was
        // issued to, and that party must be this server; otherwise another client's token
        // that merely lists this server would sign its user in here.
        let several_audiences = matches!(&claims.aud, Audience::Many(all) if all.len() > 1);
        match &claims.azp {
            Some(azp) if *azp != self.settings.audience => return Err(TokenRefusal::Invalid),
            None if several_audiences => return Err(TokenRefusal::Invalid),
            _ => {}
        }
        if token_use == TokenUse::Reauthentication {
            let signed_in_recently = claims.auth_time.is_some_and(|auth_time| {
                auth_time <= now_unix + skew && auth_time >= now_unix - age_max - skew
            });
            if !signed_in_recently {
                return Err(TokenRefusal::NoFreshSignIn);
            }
        }
        // No token is accepted past its expiry or past the longest age any use allows.
        let age_max_any = i64::try_from(
            LOGIN_TOKEN_AGE_MAX
                .max(REAUTHENTICATION_TOKEN_AGE_MAX)
                .as_secs(),
        )
        .unwrap_or(i64::MAX);
        let usable_until_unix = claims
            .exp
            .min(claims.iat.saturating_add(age_max_any))
            .saturating_add(skew);
        let usable_until = chartlog_domain::Timestamp::from_unix_micros(
            usable_until_unix.saturating_mul(1_000_000),
        )
        .map_err(|_| TokenRefusal::Invalid)?;
        Ok(IdentityAssertion {
            second_factor: second_factor_asserted(&claims.amr),
            subject: claims.sub,
            token_digest: single_use_digest(token),
            usable_until,
        })
    }

    /// The key `kid`, reading the key file again (at most once a minute) if it is new.
    fn key(&self, kid: &str, algorithm: Algorithm) -> Result<DecodingKey, TokenRefusal> {
        let found = |keys: &Keys| keys.set.find(kid).cloned();
        let mut jwk = self
            .keys
            .read()
            .map_err(|_| TokenRefusal::UnknownKey)
            .map(|keys| found(&keys))?;
        if jwk.is_none() {
            let mut keys = self.keys.write().map_err(|_| TokenRefusal::UnknownKey)?;
            if keys.read_at.elapsed() >= KEY_RELOAD_INTERVAL {
                keys.read_at = Instant::now();
                match read_jwks(&self.settings.jwks_path) {
                    Ok(set) => keys.set = set,
                    Err(error) => tracing::warn!(%error, "identity provider keys not reloaded"),
                }
            }
            jwk = found(&keys);
        }
        let jwk = jwk.ok_or(TokenRefusal::UnknownKey)?;
        // A key published for one algorithm is not used with another.
        if let Some(published) = jwk.common.key_algorithm
            && format!("{published:?}") != format!("{algorithm:?}")
        {
            return Err(TokenRefusal::AlgorithmNotAccepted);
        }
        DecodingKey::from_jwk(&jwk).map_err(|_| TokenRefusal::UnknownKey)
    }
}

/// What spends a token: SHA-256 of its signed part (`header.payload`), not of the whole token.
/// The same signed part can carry more than one valid signature: an ECDSA signature (r, s)
/// verifies as (r, n − s) too, and ring accepts both, so a digest over the whole token would
/// let a captured, spent ES256 token be replayed with its signature re-encoded. What the
/// provider signed cannot change without its key.
fn single_use_digest(token: &str) -> [u8; 32] {
    let signed_part = token.rsplit_once('.').map_or(token, |(signed, _)| signed);
    Sha256::digest(signed_part.as_bytes()).into()
}

/// RFC 8176: `mfa`, or a possession or inherence method with any other method.
fn second_factor_asserted(amr: &[String]) -> bool {
    let mut methods: Vec<&str> = amr.iter().map(String::as_str).collect();
    methods.sort_unstable();
    methods.dedup();
    methods.contains(&"mfa")
        || (methods.len() >= 2
            && methods
                .iter()
                .any(|method| SECOND_FACTOR_METHODS.contains(method)))
}

fn read_jwks(path: &Path) -> Result<JwkSet, SsoSetupError> {
    let unreadable = |source| SsoSetupError::Unreadable {
        path: path.to_owned(),
        source,
    };
    let malformed = |reason: String| SsoSetupError::Malformed {
        path: path.to_owned(),
        reason,
    };
    let length = std::fs::metadata(path).map_err(unreadable)?.len();
    if length > JWKS_BYTES_MAX {
        return Err(malformed(format!("larger than {JWKS_BYTES_MAX} bytes")));
    }
    let bytes = std::fs::read(path).map_err(unreadable)?;
    let set: JwkSet = serde_json::from_slice(&bytes)
        .map_err(|error| malformed(format!("line {}, column {}", error.line(), error.column())))?;
    if set.keys.is_empty() {
        return Err(malformed("it holds no key".to_owned()));
    }
    if set.keys.iter().any(|key| key.common.key_id.is_none()) {
        return Err(malformed("every key needs a key id (kid)".to_owned()));
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};
    use ring::signature::KeyPair as _;
    use serde_json::json;

    use super::*;

    const ISSUER: &str = "https://id.clinic.example";
    const AUDIENCE: &str = "chartlog";
    /// jsonwebtoken checks `exp` and `nbf` against the system clock, so the tests' tokens are
    /// made around it.
    static NOW: std::sync::LazyLock<i64> = std::sync::LazyLock::new(|| {
        i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970")
                .as_secs(),
        )
        .expect("in range")
    });

    struct Provider {
        key: EncodingKey,
        public: Vec<u8>,
    }

    impl Provider {
        fn new() -> Self {
            let rng = ring::rand::SystemRandom::new();
            let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
            let pair =
                ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key pair");
            Self {
                key: EncodingKey::from_ed_der(pkcs8.as_ref()),
                public: pair.public_key().as_ref().to_vec(),
            }
        }

        fn jwks(&self, kid: &str) -> serde_json::Value {
            use base64::Engine as _;
            json!({ "keys": [{
                "kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA", "kid": kid,
                "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&self.public),
            }]})
        }

        fn token(&self, kid: &str, claims: serde_json::Value) -> String {
            let mut header = Header::new(Algorithm::EdDSA);
            header.kid = Some(kid.to_owned());
            jsonwebtoken::encode(&header, &claims, &self.key).expect("token")
        }
    }

    fn now() -> chartlog_domain::Timestamp {
        chartlog_domain::Timestamp::from_unix_micros(*NOW * 1_000_000).expect("in range")
    }

    fn claims() -> serde_json::Value {
        json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": "248289761001",
            "iat": *NOW - 5, "exp": *NOW + 300, "amr": ["pwd", "otp"],
        })
    }

    fn trusting(dir: &Path, jwks: &serde_json::Value) -> IdentityProvider {
        let path = dir.join("jwks.json");
        std::fs::write(&path, jwks.to_string()).expect("write jwks");
        IdentityProvider::load(SsoSettings {
            issuer: ISSUER.to_owned(),
            audience: AUDIENCE.to_owned(),
            jwks_path: path,
        })
        .expect("provider")
    }

    #[test]
    fn a_valid_token_asserts_its_subject_until_it_may_no_longer_be_used() {
        let dir = tempfile::tempdir().expect("dir");
        let provider = Provider::new();
        let trusted = trusting(dir.path(), &provider.jwks("k1"));
        let token = provider.token("k1", claims());
        let identity = trusted
            .verify(&token, now(), TokenUse::Login)
            .expect("verified");
        assert_eq!(identity.subject, "248289761001");
        assert!(identity.second_factor);
        let (signed_part, _) = token.rsplit_once('.').expect("three parts");
        let digest: [u8; 32] = Sha256::digest(signed_part.as_bytes()).into();
        assert_eq!(identity.token_digest, digest);
        // Issued 5 s ago, expiring in 300 s: usable for 300 s, plus the clock skew.
        let skew = CLOCK_SKEW_SECONDS as i64;
        assert_eq!(
            identity.usable_until.unix_micros(),
            (*NOW + 300 + skew) * 1_000_000
        );
        // A token that lives longer than any use allows is kept only as long as it is usable.
        let mut long_lived = claims();
        long_lived["exp"] = json!(*NOW + 86_400);
        let identity = trusted
            .verify(&provider.token("k1", long_lived), now(), TokenUse::Login)
            .expect("verified");
        let age_max = LOGIN_TOKEN_AGE_MAX.as_secs() as i64;
        assert_eq!(
            identity.usable_until.unix_micros(),
            (*NOW - 5 + age_max + skew) * 1_000_000
        );
    }

    /// Subtracts a big-endian 256-bit `s` from the P-256 group order: the other `s` of an
    /// ECDSA signature, (r, n − s), which verifies as well.
    fn p256_negated(s: &[u8]) -> [u8; 32] {
        const ORDER: [u8; 32] = [
            0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2,
            0xfc, 0x63, 0x25, 0x51,
        ];
        let mut negated = [0u8; 32];
        let mut borrow = 0i16;
        for i in (0..32).rev() {
            let mut digit = i16::from(ORDER[i]) - i16::from(s[i]) - borrow;
            borrow = i16::from(digit < 0);
            if digit < 0 {
                digit += 256;
            }
            negated[i] = u8::try_from(digit).expect("a byte");
        }
        assert_eq!(borrow, 0, "s is below the order");
        negated
    }

    /// Bug this catches: the single-use digest taken over the whole token, signature
    /// included, so that a spent ES256 token with its signature re-encoded was new again.
    #[test]
    fn a_token_whose_signature_is_re_encoded_is_the_same_token() {
        use base64::Engine as _;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;

        let rng = ring::rand::SystemRandom::new();
        let algorithm = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(algorithm, &rng).expect("key");
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(algorithm, pkcs8.as_ref(), &rng)
            .expect("key pair");
        // An uncompressed point: 0x04, then x and y.
        let point = pair.public_key().as_ref();
        let jwks = json!({ "keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": "ec1",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]});
        let dir = tempfile::tempdir().expect("dir");
        let trusted = trusting(dir.path(), &jwks);
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("ec1".to_owned());
        let token = jsonwebtoken::encode(
            &header,
            &claims(),
            &EncodingKey::from_ec_der(pkcs8.as_ref()),
        )
        .expect("token");

        let (signed_part, signature) = token.rsplit_once('.').expect("three parts");
        let mut signature = URL_SAFE_NO_PAD.decode(signature).expect("base64url");
        let negated = p256_negated(&signature[32..]);
        signature[32..].copy_from_slice(&negated);
        let twin = format!("{signed_part}.{}", URL_SAFE_NO_PAD.encode(&signature));
        assert_ne!(twin, token);

        let spent = trusted
            .verify(&token, now(), TokenUse::Login)
            .expect("verified");
        let replayed = trusted
            .verify(&twin, now(), TokenUse::Login)
            .expect("(r, n - s) verifies too");
        assert_eq!(replayed.token_digest, spent.token_digest);
        // Another token of the same provider is another token.
        let mut later = claims();
        later["iat"] = json!(*NOW - 4);
        let other =
            jsonwebtoken::encode(&header, &later, &EncodingKey::from_ec_der(pkcs8.as_ref()))
                .expect("token");
        assert_ne!(
            trusted
                .verify(&other, now(), TokenUse::Login)
                .expect("verified")
                .token_digest,
            spent.token_digest
        );
    }

    #[test]
    fn re_authentication_needs_a_sign_in_at_the_provider_moments_ago() {
        let dir = tempfile::tempdir().expect("dir");
        let provider = Provider::new();
        let trusted = trusting(dir.path(), &provider.jwks("k1"));
        let with_auth_time = |auth_time: Option<i64>| {
            let mut claims = claims();
            if let Some(auth_time) = auth_time {
                claims["auth_time"] = json!(auth_time);
            }
            provider.token("k1", claims)
        };
        // A token issued just now on a sign-in of an hour ago (a silent renewal), or one that
        // does not say when the user signed in, proves nobody is at the keyboard.
        for auth_time in [None, Some(*NOW - 3600), Some(*NOW + 600)] {
            let token = with_auth_time(auth_time);
            assert_eq!(
                trusted.verify(&token, now(), TokenUse::Reauthentication),
                Err(TokenRefusal::NoFreshSignIn),
                "{auth_time:?}"
            );
            assert!(trusted.verify(&token, now(), TokenUse::Login).is_ok());
        }
        let fresh = with_auth_time(Some(*NOW - 30));
        assert!(
            trusted
                .verify(&fresh, now(), TokenUse::Reauthentication)
                .is_ok()
        );
    }

    #[test]
    fn a_token_for_several_audiences_must_have_been_issued_to_this_server() {
        let dir = tempfile::tempdir().expect("dir");
        let provider = Provider::new();
        let trusted = trusting(dir.path(), &provider.jwks("k1"));
        let with = |aud: serde_json::Value, azp: Option<&str>| {
            let mut claims = claims();
            claims["aud"] = aud;
            if let Some(azp) = azp {
                claims["azp"] = json!(azp);
            }
            provider.token("k1", claims)
        };
        let both = json!([AUDIENCE, "another-app"]);
        for (case, token, accepted) in [
            ("one audience", with(json!(AUDIENCE), None), true),
            ("issued to us", with(both.clone(), Some(AUDIENCE)), true),
            (
                "issued to them",
                with(both.clone(), Some("another-app")),
                false,
            ),
            ("issued to nobody named", with(both, None), false),
            (
                "one audience, another party",
                with(json!(AUDIENCE), Some("another-app")),
                false,
            ),
        ] {
            let verified = trusted.verify(&token, now(), TokenUse::Login);
            assert_eq!(verified.is_ok(), accepted, "{case}: {verified:?}");
        }
    }

    #[test]
    fn tokens_for_someone_else_or_out_of_time_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let provider = Provider::new();
        let trusted = trusting(dir.path(), &provider.jwks("k1"));
        let with = |field: &str, value: serde_json::Value| {
            let mut claims = claims();
            claims[field] = value;
            provider.token("k1", claims)
        };
        for (case, token, refusal) in [
            (
                "issuer",
                with("iss", json!("https://evil.example")),
                TokenRefusal::Invalid,
            ),
            (
                "audience",
                with("aud", json!("another-app")),
                TokenRefusal::Invalid,
            ),
            (
                "expired",
                with("exp", json!(*NOW - 120)),
                TokenRefusal::Invalid,
            ),
            (
                "not yet valid",
                with("nbf", json!(*NOW + 600)),
                TokenRefusal::Invalid,
            ),
            ("old", with("iat", json!(*NOW - 3600)), TokenRefusal::Stale),
            (
                "future",
                with("iat", json!(*NOW + 600)),
                TokenRefusal::Stale,
            ),
            (
                "unknown key",
                provider.token("k2", claims()),
                TokenRefusal::UnknownKey,
            ),
            ("not a JWT", "not.a.jwt".to_owned(), TokenRefusal::Malformed),
        ] {
            assert_eq!(
                trusted.verify(&token, now(), TokenUse::Login),
                Err(refusal),
                "{case}"
            );
        }
        // Another key under the trusted key's id: the signature fails.
        let impostor = Provider::new();
        assert_eq!(
            trusted.verify(&impostor.token("k1", claims()), now(), TokenUse::Login),
            Err(TokenRefusal::Invalid)
        );
        // An HMAC token, even one naming the trusted key, is never looked at.
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".to_owned());
        let hmac = jsonwebtoken::encode(
            &header,
            &claims(),
            &EncodingKey::from_secret(&provider.public),
        )
        .expect("token");
        assert_eq!(
            trusted.verify(&hmac, now(), TokenUse::Login),
            Err(TokenRefusal::AlgorithmNotAccepted)
        );
    }

    #[test]
    fn a_second_factor_is_mfa_or_a_possession_or_inherence_method_with_another() {
        let amr = |methods: &[&str]| {
            second_factor_asserted(&methods.iter().map(|m| (*m).to_owned()).collect::<Vec<_>>())
        };
        assert!(amr(&["mfa"]));
        assert!(amr(&["pwd", "otp"]));
        assert!(amr(&["hwk", "pin"]));
        assert!(!amr(&["pwd"]));
        assert!(!amr(&["otp"]));
        assert!(!amr(&["pwd", "pwd"]));
        assert!(!amr(&["pwd", "kba"]));
        assert!(!amr(&[]));
    }

    #[test]
    fn a_key_file_without_keys_or_key_ids_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("jwks.json");
        for jwks in [json!({ "keys": [] }), {
            let mut set = Provider::new().jwks("k1");
            set["keys"][0].as_object_mut().expect("key").remove("kid");
            set
        }] {
            std::fs::write(&path, jwks.to_string()).expect("write");
            let refused = IdentityProvider::load(SsoSettings {
                issuer: ISSUER.to_owned(),
                audience: AUDIENCE.to_owned(),
                jwks_path: path.clone(),
            });
            assert!(matches!(refused, Err(SsoSetupError::Malformed { .. })));
        }
    }
}
