//! The READY line: how a Squall process says it serves, and where.
//!
//! Every role prints one line on standard output once it serves, `READY key=value ...`
//! (`READY http=http://127.0.0.1:8080 kvs=tcp://127.0.0.1:7100`), and whatever started it (a
//! test, a benchmark, `squall cluster up`, an operator's script) reads the addresses from it.
//! [`format()`] writes it and [`parse`] reads it, so printers and readers cannot disagree.
//!
//! Values are escaped so that any value survives the trip: `%`, space, `=`, tab, carriage
//! return and newline become `%25`, `%20`, `%3D`, `%09`, `%0D` and `%0A` (a data directory with
//! a space in its path, say). Keys are the printer's own identifiers and are not escaped.

/// The word a READY line starts with.
pub const PREFIX: &str = "READY";

/// The READY line of `fields`, in their order.
pub fn format(fields: &[(&str, &str)]) -> String {
    let mut line = String::from(PREFIX);
    for (key, value) in fields {
        line.push(' ');
        line.push_str(key);
        line.push('=');
        escape_into(value, &mut line);
    }
    line
}

/// The fields of `line` if it is a READY line; `None` if it is another line of output. A
/// word without `=` or a bad escape makes the line not a READY line.
pub fn parse(line: &str) -> Option<Vec<(String, String)>> {
    let rest = line.trim_end_matches(['\r', '\n']).strip_prefix(PREFIX)?;
    if !(rest.is_empty() || rest.starts_with(' ')) {
        return None;
    }
    rest.split(' ')
        .filter(|word| !word.is_empty())
        .map(|word| {
            let (key, value) = word.split_once('=')?;
            Some((key.to_string(), unescape(value)?))
        })
        .collect()
}

/// The value of `key` among parsed fields.
pub fn field<'a>(fields: &'a [(String, String)], key: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn escape_into(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '%' => out.push_str("%25"),
            ' ' => out.push_str("%20"),
            '=' => out.push_str("%3D"),
            '\t' => out.push_str("%09"),
            '\r' => out.push_str("%0D"),
            '\n' => out.push_str("%0A"),
            c => out.push(c),
        }
    }
}

fn unescape(value: &str) -> Option<String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 3)?;
        out.push(match code {
            "25" => '%',
            "20" => ' ',
            "3D" => '=',
            "09" => '\t',
            "0D" => '\r',
            "0A" => '\n',
            _ => return None,
        });
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_line_reads_back_as_written() {
        let line = format(&[
            ("http", "http://127.0.0.1:8080"),
            ("logs", "/tmp/a dir/100%=x"),
        ]);
        assert_eq!(
            line,
            "READY http=http://127.0.0.1:8080 logs=/tmp/a%20dir/100%25%3Dx"
        );
        let fields = parse(&line).expect("a READY line");
        assert_eq!(field(&fields, "http"), Some("http://127.0.0.1:8080"));
        assert_eq!(field(&fields, "logs"), Some("/tmp/a dir/100%=x"));
        assert_eq!(field(&fields, "kvs"), None);
    }

    #[test]
    fn other_lines_are_not_ready_lines() {
        assert_eq!(parse("READYX a=b"), None);
        assert_eq!(parse("squall up"), None);
        assert_eq!(parse("READY nokey"), None);
        assert_eq!(parse("READY a=%zz"), None);
        assert_eq!(parse("READY a=%2"), None);
        assert_eq!(parse("READY\n"), Some(vec![]));
    }

    proptest! {
        #[test]
        fn any_values_survive(values in proptest::collection::vec(".*", 0..5)) {
            let keys: Vec<String> = (0..values.len()).map(|i| format!("k{i}")).collect();
            let fields: Vec<(&str, &str)> =
                keys.iter().map(String::as_str).zip(values.iter().map(String::as_str)).collect();
            let line = format(&fields);
            prop_assert!(!line.contains('\n'));
            let parsed = parse(&line).expect("a READY line");
            let expected: Vec<(String, String)> =
                fields.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            prop_assert_eq!(parsed, expected);
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(line in ".*") {
            let _ = parse(&line);
        }
    }
}
