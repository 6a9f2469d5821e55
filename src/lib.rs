//! The parts of the `chartlog` binary that decode untrusted files without touching a database:
//! the backup file's records and the configuration file's layer. The binary uses them as
//! they are; the fuzz targets (`fuzz/`) call the same functions on arbitrary input.
#![forbid(unsafe_code)]

pub mod backup_format;
pub mod config_layer;
