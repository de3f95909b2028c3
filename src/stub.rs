//! The Deepgram-compatible stub upstream.
