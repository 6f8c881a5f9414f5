//! oqt-compress: the methods that turn a float model into a compressed one.
//! Methods never print or parse arguments; they report progress through a callback.

pub mod calibrate;
pub mod rtn;
