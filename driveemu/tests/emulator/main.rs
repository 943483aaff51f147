//! Raw-HTTP tests of the Drive v3 emulator: each speaks the wire protocol as Google documents it.

mod auth;
mod common;
mod faults;
mod files;
mod listing;
mod more;
mod transfers;
