//! End-to-end tests of the local stack live in tests/.
