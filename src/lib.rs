//! Switchyard: a blue/green traffic switch for Deepgram self-hosted API containers.

pub mod stub;
