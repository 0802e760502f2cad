//! Multi-process tests: real `squall` processes on loopback, talked to over real sockets.
//!
//! One test binary (one link) with a module per topic; `support` spawns and stops nodes.

mod changes;
mod cli;
mod cluster;
mod commands;
mod consistency;
mod crash;
mod durable;
mod futures;
mod garbage;
mod gateway;
mod keys;
mod namespaces;
mod secret;
mod squeezenet;
mod support;
mod tls;
mod triggers;
