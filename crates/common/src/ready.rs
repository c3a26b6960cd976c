//! The stdout contract of servers: one line `ready key=value ...` once every socket is bound.
//!
//! Tests, the scenario runner and scripts parse this line, never log text.

use std::collections::BTreeMap;
use std::io::Write;

/// Prints `ready k1=v1 k2=v2` on stdout and flushes it.
pub fn announce(fields: &[(&str, &str)]) {
    let mut line = String::from("ready");
    for (k, v) in fields {
        line.push(' ');
        line.push_str(k);
        line.push('=');
        line.push_str(v);
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Parses a `ready ...` line into its fields; `None` for any other line.
pub fn parse(line: &str) -> Option<BTreeMap<String, String>> {
    let rest = line.trim_end().strip_prefix("ready")?;
    if !(rest.is_empty() || rest.starts_with(' ')) {
        return None;
    }
    Some(
        rest.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields() {
        let f =
            parse("ready frontend=tcp://127.0.0.1:1 backend=tcp://127.0.0.1:2\n").expect("ready");
        assert_eq!(f["frontend"], "tcp://127.0.0.1:1");
        assert_eq!(f["backend"], "tcp://127.0.0.1:2");
        assert!(parse("readyx a=b").is_none());
        assert!(parse("{\"a\":1}").is_none());
    }
}
