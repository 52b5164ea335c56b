//! A deployment's certificates: a CA, one certificate per site, admin client certificates.
//!
//! Owns: the identities geomirror checks, and making them with rcgen.
//! - A **site** certificate names its site twice: a DNS name (`dc1`), which the peer
//!   connects to as the TLS server name, and a URI `geomirror:site:dc1`, the identity the
//!   replication port checks. It may act as TLS server and client (mutual TLS both ways).
//! - An **admin** certificate carries `geomirror:admin:<name>` and client use only, so it is
//!   refused on the replication port, and a site certificate is refused by the admin API.
//!
//! Must not: decide trust. The transport and the admin API verify peers against the CA and
//! these identities; this module only issues. Certificates made with openssl work as long
//! as they carry the same SANs (certs/README.md shows the commands).

use crate::names::{self, NameError};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use std::path::{Path, PathBuf};
use thiserror::Error;
use time::{Duration, OffsetDateTime};

pub const SITE_URI_PREFIX: &str = "geomirror:site:";
pub const ADMIN_URI_PREFIX: &str = "geomirror:admin:";

#[derive(Debug, Error)]
pub enum CertError {
    #[error("{0}")]
    Name(#[from] NameError),
    #[error("cannot make a certificate")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path} already exists; pass --force to replace it (the old file is then lost)")]
    Exists { path: PathBuf },
    #[error("cannot write {path}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: std::io::Error },
}

/// When a certificate is valid.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clocks differ a little between datacenters) for `days` days.
    pub fn days_from_now(days: i64) -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity { not_before: now - Duration::hours(1), not_after: now + Duration::days(days) }
    }
}

/// A certificate and its private key, in PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A CA able to issue: its certificate and key.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
}

fn params(common_name: &str, validity: Validity) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "geomirror");
    p.distinguished_name = dn;
    p.not_before = validity.not_before;
    p.not_after = validity.not_after;
    p
}

impl Ca {
    pub fn generate(deployment: &str, validity: Validity) -> Result<Ca, CertError> {
        names::check_name(deployment)?;
        let mut p = params(&format!("geomirror CA {deployment}"), validity);
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = p.self_signed(&key)?;
        Ok(Ca { cert, key })
    }

    /// Loads a CA made earlier (by this module or by openssl) to issue more certificates.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, CertError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert = CertificateParams::from_ca_cert_pem(cert_pem)?.self_signed(&key)?;
        Ok(Ca { cert, key })
    }

    pub fn issued(&self) -> Issued {
        Issued { cert_pem: self.cert.pem(), key_pem: self.key.serialize_pem() }
    }

    /// A site's certificate: DNS name and `geomirror:site:<site>`, server and client use.
    pub fn issue_site(&self, site: &str, validity: Validity) -> Result<Issued, CertError> {
        names::check_site_name(site)?;
        let mut p = params(site, validity);
        p.subject_alt_names = vec![SanType::DnsName(site.try_into()?), SanType::URI(format!("{SITE_URI_PREFIX}{site}").try_into()?)];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.sign(p)
    }

    /// An operator's certificate for the admin API: `geomirror:admin:<name>`, client use only.
    pub fn issue_admin(&self, name: &str, validity: Validity) -> Result<Issued, CertError> {
        names::check_name(name)?;
        let mut p = params(&format!("admin {name}"), validity);
        p.subject_alt_names = vec![SanType::URI(format!("{ADMIN_URI_PREFIX}{name}").try_into()?)];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.sign(p)
    }

    fn sign(&self, p: CertificateParams) -> Result<Issued, CertError> {
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// What `write_deployment` produced, for the command's report.
pub struct Written {
    pub files: Vec<PathBuf>,
    pub ca_reused: bool,
}

/// Writes `ca.pem`/`ca.key` (or reuses them when present), `<site>.pem`/`<site>.key` per
/// site and `admin-<name>.pem`/`.key` per admin into `dir`. Keys are written owner-only.
/// Existing site or admin files are kept unless `force`.
pub fn write_deployment(
    dir: &Path,
    deployment: &str,
    sites: &[String],
    admins: &[String],
    validity: Validity,
    force: bool,
) -> Result<Written, CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Write { path: dir.to_owned(), source })?;
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let mut files = Vec::new();
    let ca_reused = ca_cert.exists() && ca_key.exists();
    let ca = if ca_reused {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|source| CertError::Read { path: p.to_owned(), source });
        Ca::load(&read(&ca_cert)?, &read(&ca_key)?)?
    } else {
        let ca = Ca::generate(deployment, Validity { not_after: validity.not_before + Duration::days(3650), ..validity })?;
        write_pair(&ca.issued(), &ca_cert, &ca_key, force)?;
        files.extend([ca_cert, ca_key]);
        ca
    };
    let mut planned = Vec::new();
    for s in sites {
        planned.push((ca.issue_site(s, validity)?, dir.join(format!("{s}.pem")), dir.join(format!("{s}.key"))));
    }
    for a in admins {
        planned.push((ca.issue_admin(a, validity)?, dir.join(format!("admin-{a}.pem")), dir.join(format!("admin-{a}.key"))));
    }
    // Refuse before writing anything, so a refusal leaves the directory as it was.
    if !force {
        if let Some(p) = planned.iter().flat_map(|(_, c, k)| [c, k]).find(|p| p.exists()) {
            return Err(CertError::Exists { path: p.clone() });
        }
    }
    for (issued, cert, key) in planned {
        write_pair(&issued, &cert, &key, true)?;
        files.extend([cert, key]);
    }
    Ok(Written { files, ca_reused })
}

fn write_pair(issued: &Issued, cert: &Path, key: &Path, force: bool) -> Result<(), CertError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    for (path, text, mode) in [(cert, &issued.cert_pem, 0o644), (key, &issued.key_pem, 0o600)] {
        if !force && path.exists() {
            return Err(CertError::Exists { path: path.to_owned() });
        }
        let err = |source| CertError::Write { path: path.to_owned(), source };
        // Write aside, then rename: a crash never leaves half a key behind.
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(err)?;
        // `mode` applies only to a file the open creates: one left by a crash keeps its own.
        f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(err)?;
        f.write_all(text.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Validity;
    use super::*;
    use x509_parser::prelude::parse_x509_pem;

    fn sans(pem: &str) -> Vec<String> {
        let (_, p) = parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = p.parse_x509().unwrap();
        let ext = cert.subject_alternative_name().unwrap().unwrap();
        ext.value.general_names.iter().map(|n| format!("{n}")).collect()
    }

    #[test]
    fn site_and_admin_identities_are_kept_apart() {
        let ca = Ca::generate("test", Validity::days_from_now(30)).unwrap();
        let site = ca.issue_site("dc1", Validity::days_from_now(30)).unwrap();
        let admin = ca.issue_admin("ops", Validity::days_from_now(30)).unwrap();
        assert_eq!(sans(&site.cert_pem), vec!["DNSName(dc1)", "URI(geomirror:site:dc1)"]);
        assert_eq!(sans(&admin.cert_pem), vec!["URI(geomirror:admin:ops)"]);
        for bad in ["dc 1", "..", "-dc1", "a..b"] {
            assert!(matches!(ca.issue_site(bad, Validity::days_from_now(1)), Err(CertError::Name(_))), "{bad}");
        }
        assert!(matches!(ca.issue_admin("../ops", Validity::days_from_now(1)), Err(CertError::Name(_))));
    }

    #[test]
    fn a_deployment_is_written_once_and_the_ca_is_reused_for_new_sites() {
        let dir = tempfile::tempdir().unwrap();
        let v = Validity::days_from_now(30);
        let w = write_deployment(dir.path(), "t", &["dc1".into(), "dc2".into()], &["ops".into()], v, false).unwrap();
        assert!(!w.ca_reused);
        assert_eq!(w.files.len(), 8);
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca.key", "dc1.key", "dc2.key", "admin-ops.key"] {
            // A site refuses a key that others may read (preflight.rs).
            assert_eq!(std::fs::metadata(dir.path().join(key)).unwrap().permissions().mode() & 0o777, 0o600, "{key}");
        }
        let ca_before = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let dc1_before = std::fs::read(dir.path().join("dc1.pem")).unwrap();
        assert!(matches!(write_deployment(dir.path(), "t", &["dc1".into()], &[], v, false), Err(CertError::Exists { .. })));
        assert_eq!(std::fs::read(dir.path().join("dc1.pem")).unwrap(), dc1_before, "a refusal changes nothing");
        let w = write_deployment(dir.path(), "t", &["dc3".into()], &[], v, false).unwrap();
        assert!(w.ca_reused);
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
        // dc3 is signed by the same CA key.
        let (_, ca_pem) = parse_x509_pem(&ca_before).unwrap();
        let ca = ca_pem.parse_x509().unwrap();
        let dc3 = std::fs::read(dir.path().join("dc3.pem")).unwrap();
        let (_, p) = parse_x509_pem(&dc3).unwrap();
        p.parse_x509().unwrap().verify_signature(Some(ca.public_key())).unwrap();
    }
}
