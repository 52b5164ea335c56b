//! The names an operator gives sites and volumes (and admins, in certificates), and the one
//! rule they follow.
//!
//! A name ends up in several places that each restrict it: a volume's store is the directory
//! `state_dir/<volume>`, `geomirror certs` writes `<site>.pem`, a volume is an NBD export
//! name and a metric label, and a site's name is the TLS server name its peer connects to.
//! So a name is 1 to [`MAX_NAME_CHARS`] characters of the POSIX portable filename character
//! set (`A-Z a-z 0-9 . _ -`), starting with a letter or a digit:
//! - one path component, always: no `/`, and never `.` or `..` (the first character is not
//!   a dot), so `state_dir/<volume>` stays inside `state_dir`;
//! - no hidden files (a leading dot) and nothing a command line would take for an option
//!   (a leading `-`), in the files and commands an operator types;
//! - portable to every file system and shell without quoting, and printable in logs.
//!
//! Site names must also be DNS names, as rustls checks them (dot-separated parts of 1 to 63
//! characters, none ending in `-`, the last not a number, no final dot): the peer connects
//! with the name as its TLS server name, and a site certificate carries it as a DNS name.
//!
//! Owns: the rule and its wording in errors. Must not: touch the file system.

use thiserror::Error;

/// The longest name, in characters (each one byte). Long enough for names like
/// `eu-west-1.db-primary.volume-042`, short enough that `<name>` plus a suffix stays far
/// below any file system's 255-byte name limit, and that a name stays readable in a log
/// line, a metric label and `nbdinfo --list`.
pub const MAX_NAME_CHARS: usize = 64;

/// The rule, as errors and docs state it.
pub const NAME_RULE: &str =
    "1 to 64 characters from A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter or a digit (names become directory and file names, NBD export names and metric labels)";

/// Why a name is refused. The message says what the name is, what is wrong, and the rule.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{name:?} is {reason}; a name is {NAME_RULE}")]
    Rule { name: String, reason: String },
    #[error(
        "{name:?} is not a DNS name, which a site name must also be (the peer uses it as the TLS server name): dot-separated parts of 1 to 63 characters, none ending in '-', the last not a number, no final dot"
    )]
    NotDns { name: String },
}

/// Checks a volume's (or an admin's, or a deployment's) name against the rule.
pub fn check_name(name: &str) -> Result<(), NameError> {
    let refuse = |reason: String| Err(NameError::Rule { name: name.to_owned(), reason });
    if name.is_empty() {
        return refuse("empty".into());
    }
    if let Some((i, c)) = name.char_indices().find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return refuse(format!("not allowed: {c:?} at byte {i}"));
    }
    if name.len() > MAX_NAME_CHARS {
        return refuse(format!("{} characters long", name.len()));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return refuse(format!("not allowed: it starts with {:?}", &name[..1]));
    }
    Ok(())
}

/// Checks a site's name: the rule, and a DNS name as the TLS link checks it.
pub fn check_site_name(name: &str) -> Result<(), NameError> {
    check_name(name)?;
    // rustls takes "dc1." for "dc1"; two spellings of one identity would only confuse.
    if name.ends_with('.') || rustls::pki_types::DnsName::try_from(name).is_err() {
        return Err(NameError::NotDns { name: name.to_owned() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_use_pass() {
        // Every name the repository's configs, demo and tests use.
        for n in ["dc1", "dc2", "dc3", "test", "vol0", "db0", "logs", "ops", "demo", "geomirror", "a", "eu-west-1.db_0"] {
            assert_eq!(check_name(n), Ok(()), "{n}");
            assert_eq!(check_site_name(n), Ok(()), "{n}");
        }
        assert_eq!(check_name(&"a".repeat(MAX_NAME_CHARS)), Ok(()));
        assert_eq!(check_name("0abc"), Ok(()), "a digit may lead");
    }

    #[test]
    fn path_tricks_and_odd_names_are_refused() {
        for n in ["", ".", "..", "...", ".hidden", "-o", "_x", "a/b", "../x", "a\\b", "a b", "vol\0", "é", "a\n"] {
            let e = check_name(n).unwrap_err();
            assert!(matches!(&e, NameError::Rule { .. }), "{n:?}: {e}");
            assert!(e.to_string().contains("starting with a letter or a digit"), "{n:?}: the rule is stated: {e}");
        }
        let long = check_name(&"a".repeat(MAX_NAME_CHARS + 1)).unwrap_err().to_string();
        assert!(long.contains("65 characters long"), "{long}");
        assert!(check_name("..").unwrap_err().to_string().contains("starts with \".\""));
        assert!(check_name("a/b").unwrap_err().to_string().contains("'/' at byte 1"));
    }

    #[test]
    fn site_names_are_also_dns_names() {
        for n in ["a..b", "dc1.", "x-", "a.-b", "123", "dc.42", &"a".repeat(64)] {
            assert_eq!(check_name(n), Ok(()), "{n:?} is a good volume name");
            assert!(matches!(check_site_name(n), Err(NameError::NotDns { .. })), "{n:?}");
        }
        assert!(matches!(check_site_name("a..b"), Err(NameError::NotDns { .. })));
        assert_eq!(check_site_name("dc1.example"), Ok(()));
    }
}
