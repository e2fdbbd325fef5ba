//! The subcommands of the `famc` binary, one file each, and the flags they share (`common`).

#[macro_use]
pub mod out;

pub mod bench;
pub mod common;
pub mod doctor;
pub mod eval;
pub mod export;
pub mod generate;
pub mod inspect;
pub mod run;
pub mod score;
pub mod serve;
