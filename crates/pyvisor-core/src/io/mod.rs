//! Socket I/O with one worker: [`reader`] turns bytes into protocol messages, [`writer`] puts
//! frames on the socket without an actor or task hop. Neither knows about calls or actors.

pub(crate) mod reader;
pub(crate) mod writer;
