//! A throw-away certificate authority for mutual-TLS tests, made with `rcgen`.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// Paths of one certificate and its private key, PEM encoded.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// A CA plus a server certificate (for `127.0.0.1` and `localhost`) and a
/// client certificate signed by it, written as PEM files into a directory.
///
/// A second, unrelated CA signs [`TestPki::rogue_client`], for tests that a
/// certificate from the wrong authority is refused.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The CA certificate that signed `server` and `client`.
    pub ca: PathBuf,
    /// Server certificate for `127.0.0.1`, `::1` and `localhost`.
    pub server: TlsFiles,
    /// Client certificate (client-auth usage) signed by `ca`.
    pub client: TlsFiles,
    /// Client certificate signed by another CA.
    pub rogue_client: TlsFiles,
    /// The directory holding the files (and the CA's key).
    dir: PathBuf,
}

impl TestPki {
    /// Generates the certificates and writes them into `dir`.
    ///
    /// # Panics
    ///
    /// When generation or writing fails (a broken test environment).
    pub fn generate(dir: &Path) -> Self {
        let ca = new_ca("mesh test CA");
        let rogue_ca = new_ca("rogue CA");
        let ca_path = dir.join("ca.pem");
        write(&ca_path, &ca.pem());
        write(&dir.join("ca-key.pem"), &ca.key().serialize_pem());

        let server = leaf(
            &ca,
            "etcd server",
            &["127.0.0.1", "::1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = leaf(&ca, "mesh client", &[], ExtendedKeyUsagePurpose::ClientAuth);
        let rogue = leaf(
            &rogue_ca,
            "rogue client",
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        Self {
            ca: ca_path,
            server: server.write(dir, "server"),
            client: client.write(dir, "client"),
            rogue_client: rogue.write(dir, "rogue-client"),
            dir: dir.to_owned(),
        }
    }

    /// Issues a client certificate with common name `cn` (etcd takes the
    /// CN as the user name when authentication is on), written as
    /// `client-<cn>.pem` and `client-<cn>-key.pem`.
    ///
    /// # Panics
    ///
    /// When the CA cannot be read back or signing fails.
    pub fn issue_client(&self, cn: &str) -> TlsFiles {
        let read = |p: &Path| {
            std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
        };
        let key = KeyPair::from_pem(&read(&self.dir.join("ca-key.pem"))).expect("CA key");
        let issuer = Issuer::from_ca_cert_pem(&read(&self.ca), key).expect("CA certificate");
        leaf(&issuer, cn, &[], ExtendedKeyUsagePurpose::ClientAuth)
            .write(&self.dir, &format!("client-{cn}"))
    }
}

struct Leaf {
    cert: String,
    key: String,
}

impl Leaf {
    fn write(&self, dir: &Path, name: &str) -> TlsFiles {
        let files = TlsFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
        };
        write(&files.cert, &self.cert);
        write(&files.key, &self.key);
        files
    }
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().expect("generate CA key");
    CertifiedIssuer::self_signed(params, key).expect("self-sign CA")
}

fn leaf(
    ca: &Issuer<'_, impl rcgen::SigningKey>,
    name: &str,
    sans: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> Leaf {
    let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
    let mut params = CertificateParams::new(sans).expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().expect("generate leaf key");
    let cert = params.signed_by(&key, ca).expect("sign leaf");
    Leaf {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
