//! The redis engine (being written).
