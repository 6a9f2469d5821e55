//! Integration tests of chartlog-crypto: one test binary, one module per concern.

mod chain;
mod data_keys;
mod key_files;
mod manifest;
mod sealing;
mod support;
