//! Subcommands of the `famc` binary that live outside main.rs.

pub mod bench;
pub mod generate;
pub mod score;
