//! chartlog-access: who may sign in, and how.
#![forbid(unsafe_code)]
