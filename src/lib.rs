//! yametee-deploy: brings the yametee hosts from an inventory file to running, firewalled,
//! verified state over SSH.
//!
//! The stages are plain values: [`inventory`] parses and validates, [`render`] produces each
//! host's desired state, [`facts`] reads the current state, [`plan`] compares the two,
//! [`apply`] carries the plan out, [`verify`] checks the result and [`status`] shows the
//! queue and its workers.

pub mod apply;
pub mod cli;
pub mod deploy;
pub mod facts;
pub mod inventory;
pub mod lab;
pub mod plan;
pub mod postgres;
pub mod progress;
pub mod queue;
pub mod render;
pub mod report;
pub mod secrets;
pub mod ssh;
pub mod status;
pub mod verify;
