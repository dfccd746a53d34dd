//! yametee-deploy: brings the yametee hosts from an inventory file to running, firewalled,
//! verified state over SSH.

pub mod facts;
pub mod inventory;
pub mod lab;
pub mod plan;
pub mod render;
pub mod secrets;
pub mod ssh;
