//! Subcommands of the `famc` binary that live outside main.rs.

#[macro_use]
pub mod out;

pub mod bench;
pub mod generate;
pub mod score;
pub mod serve;
