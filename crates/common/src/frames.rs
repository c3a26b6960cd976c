//! Small helpers between `ZmqMessage` and frame vectors.

use bytes::Bytes;
use zeromq::ZmqMessage;

/// Builds a message from frames; `None` when there are no frames (ZeroMQ has no empty message).
pub fn message(frames: Vec<Bytes>) -> Option<ZmqMessage> {
    ZmqMessage::try_from(frames).ok()
}

/// The same, for callers that always pass at least one frame.
pub fn message_of(frames: Vec<Bytes>) -> ZmqMessage {
    message(frames).expect("callers pass at least one frame")
}

/// Short printable form of a frame for logs: text if it is text, hex otherwise, cut at 32 bytes.
pub fn show(frame: &[u8]) -> String {
    let cut = &frame[..frame.len().min(32)];
    let more = if frame.len() > 32 { "..." } else { "" };
    match std::str::from_utf8(cut) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => format!("{s:?}{more}"),
        _ => {
            let hex: String = cut.iter().map(|b| format!("{b:02x}")).collect();
            format!("0x{hex}{more}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_text_and_binary() {
        assert_eq!(show(b"abc"), "\"abc\"");
        assert_eq!(show(&[0, 1, 255]), "0x0001ff");
        assert!(show(&[b'a'; 40]).ends_with("..."));
    }

    #[test]
    fn empty_message_is_refused() {
        assert!(message(vec![]).is_none());
        assert_eq!(message_of(vec![Bytes::from_static(b"x")]).len(), 1);
    }
}
