//! Mutual TLS 1.3 for the replication link (DESIGN.md, "The stream").
//!
//! Every node has one key and certificate and acts as both TLS client (the
//! primary connects out) and TLS server (the replica listens). A peer is
//! trusted either by a CA file or by the pinned SHA-256 fingerprint of its
//! (usually self-signed) certificate: rustls has no TLS-PSK, and a pinned
//! self-signed certificate is as easy to deploy as a shared secret.
//!
//! Peers are addressed by IP address and certificates name nodes, not
//! addresses, so the server name is never checked: what authenticates a
//! peer is its pin or its chain to the CA.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Errors loading TLS material or generating a node certificate.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: no such file", path.display())]
    Missing { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: not a PEM file (no -----BEGIN ...----- section found)", path.display())]
    NotPem { path: PathBuf },
    #[error("{}: malformed PEM: {source}", path.display())]
    BadPem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{}: no certificate in it (expected -----BEGIN CERTIFICATE-----)", path.display())]
    NoCertificate { path: PathBuf },
    #[error(
        "{}: no private key in it (expected -----BEGIN PRIVATE KEY-----, \
         EC PRIVATE KEY or RSA PRIVATE KEY)",
        path.display()
    )]
    NoPrivateKey { path: PathBuf },
    #[error("CA file {}: certificate #{index} is not a usable trust anchor: {source}", path.display())]
    BadCa {
        path: PathBuf,
        index: usize,
        #[source]
        source: rustls::Error,
    },
    #[error("CA file {}: {source}", path.display())]
    CaVerifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("certificate {} with key {}: {source}", cert.display(), key.display())]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    #[error(
        "bad fingerprint {input:?}: {why} (expected 64 hex digits, optionally in \
         colon-separated pairs, optionally prefixed with \"sha256:\")"
    )]
    BadFingerprint { input: String, why: String },
    #[error("bad node name {name:?}: {why}")]
    BadNodeName { name: String, why: &'static str },
    #[error("{}: already exists; refusing to overwrite a private key", path.display())]
    KeyExists { path: PathBuf },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("generating the certificate of {name:?}: {source}")]
    Generate {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("the system clock is before 1970: cannot date a certificate")]
    Clock,
}

/// SHA-256 of a certificate's DER: what a peer is pinned by.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate (what `openssl x509 -fingerprint
    /// -sha256` prints for it).
    pub fn of(cert_der: &[u8]) -> Fingerprint {
        let digest = ring::digest::digest(&ring::digest::SHA256, cert_der);
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        Fingerprint(bytes)
    }

    /// Comparison without an early exit. A certificate is public, so this is
    /// hygiene rather than a defence the pin depends on.
    fn matches(&self, other: &Fingerprint) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// Lowercase hex pairs separated by ':' (the openssl layout, lowercase).
impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Accepts `ab:cd:...` (32 pairs) or 64 plain hex digits, either case, with
/// an optional `sha256:` prefix, so that our own `Display`, the hex part of
/// openssl's `-fingerprint -sha256` and `sha256sum` of a DER file all work.
impl FromStr for Fingerprint {
    type Err = TlsError;

    fn from_str(input: &str) -> Result<Fingerprint, TlsError> {
        let bad = |why: String| TlsError::BadFingerprint {
            input: input.to_owned(),
            why,
        };
        let mut text = input.trim();
        if let Some(prefix) = text.get(..7) {
            if prefix.eq_ignore_ascii_case("sha256:") {
                text = &text[7..];
            }
        }
        let digits: Vec<u8> = if text.contains(':') {
            let mut digits = Vec::with_capacity(64);
            for pair in text.split(':') {
                if pair.len() != 2 {
                    return Err(bad(format!(
                        "group {pair:?} is not 2 hex digits (colon-separated groups \
                         must be pairs)"
                    )));
                }
                digits.extend_from_slice(pair.as_bytes());
            }
            digits
        } else {
            text.as_bytes().to_vec()
        };
        if digits.len() != 64 {
            return Err(bad(format!("{} hex digits, need 64", digits.len())));
        }
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
            let mut value = 0u8;
            for &digit in pair {
                let nibble = char::from(digit)
                    .to_digit(16)
                    .ok_or_else(|| bad(format!("{:?} is not a hex digit", char::from(digit))))?;
                // to_digit(16) is below 16, so this fits.
                value = (value << 4) | nibble as u8;
            }
            *byte = value;
        }
        Ok(Fingerprint(bytes))
    }
}

/// How a node decides that the other end of the link is its peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerTrust {
    /// The peer's chain must verify to a CA in this PEM file. Every node is
    /// both TLS client and server, so a node certificate that lists extended
    /// key usages must list both serverAuth and clientAuth.
    Ca(PathBuf),
    /// The peer's end-entity certificate must have this SHA-256.
    Fingerprint(Fingerprint),
}

/// A node's identity (PEM certificate chain and key) and how it trusts peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub trust: PeerTrust,
}

/// Both ends of the link, loaded once: a node dials as a client and listens
/// as a server with the same identity and the same trust.
#[derive(Debug, Clone)]
pub struct TlsContext {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    server_name: ServerName<'static>,
    fingerprint: Fingerprint,
}

/// The name every client asks for. Fixed because peers are dialled by IP
/// address and the name is never checked (see [`AnyNameServerVerifier`]);
/// it is sent as SNI, so it says what the connection is in a capture.
const PEER_NAME: &str = "rewind-replica";

impl TlsContext {
    /// Loads volume `volume`'s identity and trust, and builds TLS 1.3-only
    /// configurations that require a certificate from the peer in both
    /// directions.
    pub fn load(settings: &TlsSettings, volume: &str) -> Result<TlsContext, TlsError> {
        let chain = load_certs(&settings.cert)?;
        let fingerprint = chain
            .first()
            .map(|cert| Fingerprint::of(cert))
            .ok_or_else(|| TlsError::NoCertificate {
                path: settings.cert.clone(),
            })?;
        let key = load_key(&settings.key)?;
        let server_name = ServerName::try_from(PEER_NAME).map_err(|err| {
            TlsError::Config(rustls::Error::General(format!(
                "server name {PEER_NAME:?}: {err}"
            )))
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let (verify_server, verify_client): (
            Arc<dyn ServerCertVerifier>,
            Arc<dyn ClientCertVerifier>,
        ) = match &settings.trust {
            PeerTrust::Fingerprint(pin) => {
                let pinned = Arc::new(PinnedPeer::new(*pin, &provider, volume));
                (pinned.clone(), pinned)
            }
            PeerTrust::Ca(path) => {
                let roots = Arc::new(load_roots(path)?);
                let ca_error = |source| TlsError::CaVerifier {
                    path: path.clone(),
                    source,
                };
                let server =
                    WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                        .build()
                        .map_err(ca_error)?;
                let client = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(ca_error)?;
                (Arc::new(AnyNameServerVerifier { inner: server }), client)
            }
        };

        let identity_error = |source| TlsError::Identity {
            cert: settings.cert.clone(),
            key: settings.key.clone(),
            source,
        };
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(verify_server)
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(identity_error)?;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(verify_client)
            .with_single_cert(chain, key)
            .map_err(identity_error)?;
        // Links are long-lived, so a full handshake per connection costs
        // nothing, and every connection is then authenticated afresh.
        client.resumption = rustls::client::Resumption::disabled();
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;

        Ok(TlsContext {
            client: Arc::new(client),
            server: Arc::new(server),
            server_name,
            fingerprint,
        })
    }

    /// For dialling a peer; pass [`TlsContext::server_name`] as the name.
    pub fn connector(&self) -> TlsConnector {
        TlsConnector::from(self.client.clone())
    }

    /// For accepting a peer; the peer must present a trusted certificate.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.server.clone())
    }

    /// The fixed name to dial every peer by: peers are addressed by IP and
    /// authenticated by pin or CA chain, never by name.
    pub fn server_name(&self) -> ServerName<'static> {
        self.server_name.clone()
    }

    /// The fingerprint of our own certificate: what peers pin.
    pub fn own_fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
}

/// Reads every PEM section of a file, so that "not PEM at all" and "PEM but
/// without the item we need" get different messages.
fn read_pem(path: &Path) -> Result<Vec<(SectionKind, Vec<u8>)>, TlsError> {
    let bytes = fs::read(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            TlsError::Missing {
                path: path.to_owned(),
            }
        } else {
            TlsError::Read {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    let sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::BadPem {
            path: path.to_owned(),
            source,
        })?;
    if sections.is_empty() {
        return Err(TlsError::NotPem {
            path: path.to_owned(),
        });
    }
    Ok(sections)
}

/// The certificates of a PEM file, end-entity first.
fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = read_pem(path)?
        .into_iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der))
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key of a PEM file (PKCS#8, SEC1 or PKCS#1).
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    read_pem(path)?
        .into_iter()
        .find_map(|(kind, der)| PrivateKeyDer::from_pem(kind, der))
        .ok_or_else(|| TlsError::NoPrivateKey {
            path: path.to_owned(),
        })
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for (index, cert) in load_certs(path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: path.to_owned(),
            index,
            source,
        })?;
    }
    Ok(roots)
}

/// Only TLS 1.3 is configured (and rustls is built without its `tls12`
/// feature); a TLS 1.2 signature reaching a verifier would be a bug, so it
/// is refused rather than checked.
fn refuse_tls12() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is refused on the replication link".into())
}

/// Trust by pin, both directions: the peer's end-entity certificate must
/// hash to the pin, and its handshake signature is still verified (the
/// signature is what proves the peer holds the key, not just the cert).
/// Intermediates and validity dates are ignored: the pin is the whole
/// trust, and removing it is how a peer is revoked.
#[derive(Debug)]
struct PinnedPeer {
    pin: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
    /// The volume's id, for the logs.
    volume: String,
}

impl PinnedPeer {
    fn new(pin: Fingerprint, provider: &CryptoProvider, volume: &str) -> PinnedPeer {
        PinnedPeer {
            pin,
            algorithms: provider.signature_verification_algorithms,
            volume: volume.to_owned(),
        }
    }

    fn check(&self, end_entity: &CertificateDer<'_>, role: &str) -> Result<(), rustls::Error> {
        let received = Fingerprint::of(end_entity);
        if received.matches(&self.pin) {
            return Ok(());
        }
        tracing::warn!(
            event = rewind_journal::events::REPLICATION_PEER_UNTRUSTED,
            volume = %self.volume,
            expected = %self.pin,
            received = %received,
            "replication peer (TLS {role}) refused: its certificate does not match the pinned \
             fingerprint"
        );
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(PinMismatch { received })),
        )))
    }

    fn verify_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

/// Why a pinned peer was refused, as the handshake error says it.
struct PinMismatch {
    received: Fingerprint,
}

/// rustls shows a certificate error's cause with `Debug`: make it the
/// sentence.
impl fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "its fingerprint {} is not the pinned one (--tls-peer-fingerprint)",
            self.received
        )
    }
}

impl std::error::Error for PinMismatch {}

impl ServerCertVerifier for PinnedPeer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, "server")?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(refuse_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for PinnedPeer {
    /// Explicit, although the default: an anonymous client is never a peer.
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// No CA names to hint: the client has exactly one certificate.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, "client")?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(refuse_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// CA trust for the client side: the full WebPKI check (chain, validity,
/// the serverAuth usage when the certificate restricts usages) except the
/// name, since peers are dialled by IP address and certificates name nodes.
/// webpki checks the name last, so a name error means all else passed.
#[derive(Debug)]
struct AnyNameServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for AnyNameServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(refuse_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

/// What [`generate_node_cert`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub fingerprint: Fingerprint,
}

/// Validity of a generated certificate: long enough never to expire under
/// a running cluster (pins, not expiry, are how trust is revoked).
const NODE_CERT_VALIDITY: Duration = Duration::from_secs(3653 * 24 * 3600);
/// Backdating, so that a peer whose clock is a little behind accepts it.
const NODE_CERT_BACKDATE: Duration = Duration::from_secs(24 * 3600);
/// X.520's upper bound for a common name; also keeps file names short.
const NODE_NAME_MAX: usize = 64;

fn check_node_name(name: &str) -> Result<(), TlsError> {
    let bad = |why| TlsError::BadNodeName {
        name: name.to_owned(),
        why,
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > NODE_NAME_MAX {
        return Err(bad("it is longer than 64 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(bad(
            "only ASCII letters, digits, '.', '-' and '_' are allowed",
        ));
    }
    Ok(())
}

/// Creates a self-signed node certificate (ECDSA P-256, SAN and CN = `name`,
/// valid 10 years) as `<out>/<name>.crt` and its key as `<out>/<name>.key`
/// (mode 0600). An existing key is never overwritten: it may be the
/// identity peers already pin. An existing certificate without its key is
/// useless and is replaced.
pub fn generate_node_cert(out: &Path, name: &str) -> Result<NodeCert, TlsError> {
    check_node_name(name)?;
    let generate_error = |source| TlsError::Generate {
        name: name.to_owned(),
        source,
    };
    let key_pair = KeyPair::generate().map_err(generate_error)?;
    let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(generate_error)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| TlsError::Clock)?;
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + now.saturating_sub(NODE_CERT_BACKDATE);
    params.not_after = epoch + now + NODE_CERT_VALIDITY;
    let cert = params.self_signed(&key_pair).map_err(generate_error)?;

    fs::create_dir_all(out).map_err(|source| TlsError::Write {
        path: out.to_owned(),
        source,
    })?;
    let cert_path = out.join(format!("{name}.crt"));
    let key_path = out.join(format!("{name}.key"));

    let key_file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                TlsError::KeyExists {
                    path: key_path.clone(),
                }
            } else {
                TlsError::Write {
                    path: key_path.clone(),
                    source,
                }
            }
        })?;
    let written =
        write_synced(key_file, &key_path, key_pair.serialize_pem().as_bytes()).and_then(|()| {
            let cert_file = File::create(&cert_path).map_err(|source| TlsError::Write {
                path: cert_path.clone(),
                source,
            })?;
            write_synced(cert_file, &cert_path, cert.pem().as_bytes())
        });
    if let Err(err) = written {
        // Best effort: a half-made identity would make the retry fail with
        // KeyExists; the original error is the one worth reporting.
        let _ = fs::remove_file(&key_path);
        return Err(err);
    }

    Ok(NodeCert {
        cert: cert_path,
        key: key_path,
        fingerprint: Fingerprint::of(cert.der()),
    })
}

fn write_synced(mut file: File, path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| TlsError::Write {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose};
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const LIMIT: Duration = Duration::from_secs(10);

    fn node(dir: &Path, name: &str) -> NodeCert {
        generate_node_cert(dir, name).expect("generate a node certificate")
    }

    fn context(cert: &Path, key: &Path, trust: PeerTrust) -> TlsContext {
        TlsContext::load(
            &TlsSettings {
                cert: cert.to_owned(),
                key: key.to_owned(),
                trust,
            },
            "test",
        )
        .expect("load a TLS context")
    }

    fn pinned(node: &NodeCert, peer: Fingerprint) -> TlsContext {
        context(&node.cert, &node.key, PeerTrust::Fingerprint(peer))
    }

    fn peer_name() -> ServerName<'static> {
        ServerName::try_from(PEER_NAME).expect("a valid DNS name")
    }

    /// One connection over loopback: the client sends "ping", the server
    /// answers "pong", then the client closes. Returns each side's outcome;
    /// a side that hangs past LIMIT fails the test.
    fn session(
        acceptor: TlsAcceptor,
        connector: TlsConnector,
    ) -> (Result<(), String>, Result<(), String>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build a tokio runtime");
        runtime.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind a loopback listener");
            let addr = listener.local_addr().expect("listener address");
            let server = async {
                let (tcp, _) = listener
                    .accept()
                    .await
                    .map_err(|e| format!("accept: {e}"))?;
                let mut tls = acceptor
                    .accept(tcp)
                    .await
                    .map_err(|e| format!("server handshake: {e}"))?;
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf)
                    .await
                    .map_err(|e| format!("server read: {e}"))?;
                if &buf != b"ping" {
                    return Err(format!("server got {buf:?}"));
                }
                tls.write_all(b"pong")
                    .await
                    .map_err(|e| format!("server write: {e}"))?;
                tls.flush()
                    .await
                    .map_err(|e| format!("server flush: {e}"))?;
                // Wait for the client's close_notify so nothing is cut short.
                let n = tls
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("server read at end: {e}"))?;
                if n != 0 {
                    return Err(format!("server got {n} more bytes"));
                }
                Ok(())
            };
            let client = async {
                let tcp = TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                let mut tls = connector
                    .connect(peer_name(), tcp)
                    .await
                    .map_err(|e| format!("client handshake: {e}"))?;
                tls.write_all(b"ping")
                    .await
                    .map_err(|e| format!("client write: {e}"))?;
                tls.flush()
                    .await
                    .map_err(|e| format!("client flush: {e}"))?;
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf)
                    .await
                    .map_err(|e| format!("client read: {e}"))?;
                if &buf != b"pong" {
                    return Err(format!("client got {buf:?}"));
                }
                tls.shutdown()
                    .await
                    .map_err(|e| format!("client shutdown: {e}"))?;
                Ok(())
            };
            let (server, client) = tokio::join!(
                tokio::time::timeout(LIMIT, server),
                tokio::time::timeout(LIMIT, client)
            );
            (
                server.expect("server side timed out"),
                client.expect("client side timed out"),
            )
        })
    }

    #[test]
    fn pinned_peers_talk_both_ways() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = node(dir.path(), "node-a");
        let b = node(dir.path(), "node-b");
        let a_ctx = pinned(&a, b.fingerprint);
        let b_ctx = pinned(&b, a.fingerprint);
        assert_eq!(a_ctx.own_fingerprint(), a.fingerprint);
        assert_eq!(b_ctx.own_fingerprint(), b.fingerprint);
        assert_eq!(a_ctx.server_name(), peer_name());

        let (server, client) = session(b_ctx.acceptor(), a_ctx.connector());
        assert_eq!(server, Ok(()));
        assert_eq!(client, Ok(()));
        // And with the roles swapped: each node is both client and server.
        let (server, client) = session(a_ctx.acceptor(), b_ctx.connector());
        assert_eq!(server, Ok(()));
        assert_eq!(client, Ok(()));
    }

    #[test]
    fn client_with_wrong_pin_refuses_the_server() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = node(dir.path(), "a");
        let b = node(dir.path(), "b");
        let other = node(dir.path(), "other");
        let client = pinned(&a, other.fingerprint);
        let server = pinned(&b, a.fingerprint);

        let (server, client) = session(server.acceptor(), client.connector());
        let client = client.expect_err("the client must refuse a server it does not pin");
        assert!(client.contains("client handshake"), "{client}");
        assert!(client.contains("is not the pinned one"), "{client}");
        server.expect_err("the server's handshake must fail too");
    }

    #[test]
    fn server_with_wrong_pin_refuses_the_client() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = node(dir.path(), "a");
        let b = node(dir.path(), "b");
        let other = node(dir.path(), "other");
        let client = pinned(&a, b.fingerprint);
        let server = pinned(&b, other.fingerprint);

        let (server, client) = session(server.acceptor(), client.connector());
        let server = server.expect_err("the server must refuse a client it does not pin");
        assert!(server.contains("server handshake"), "{server}");
        assert!(server.contains("is not the pinned one"), "{server}");
        // TLS 1.3: the client's handshake is over before the server has
        // judged its certificate; it learns of the refusal on first read.
        client.expect_err("the client must see the refusal");
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    #[test]
    fn client_without_certificate_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = node(dir.path(), "a");
        let b = node(dir.path(), "b");
        let server = pinned(&b, a.fingerprint);
        let provider = provider();
        let anonymous = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedPeer::new(
                b.fingerprint,
                &provider,
                "test",
            )))
            .with_no_client_auth();

        let (server, client) = session(server.acceptor(), TlsConnector::from(Arc::new(anonymous)));
        let server = server.expect_err("the server must require a client certificate");
        assert!(server.contains("server handshake"), "{server}");
        assert!(server.contains("no certificates"), "{server}");
        client.expect_err("the client must see the refusal");
    }

    /// Someone's certificate (public) with another key: the pin matches, so
    /// only the handshake signature can tell.
    fn stolen_identity(cert: &NodeCert, key: &NodeCert) -> Arc<rustls::sign::SingleCertAndKey> {
        let signing_key = provider()
            .key_provider
            .load_private_key(load_key(&key.key).expect("the impostor's key"))
            .expect("a usable key");
        let chain = load_certs(&cert.cert).expect("the stolen certificate");
        Arc::new(rustls::sign::CertifiedKey::new(chain, signing_key).into())
    }

    #[test]
    fn impostor_with_a_stolen_certificate_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = node(dir.path(), "a");
        let b = node(dir.path(), "b");
        let mallory = node(dir.path(), "mallory");
        let provider = provider();

        // Mallory serves b's certificate to a, which pins b.
        let fake_b = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_client_cert_verifier(Arc::new(PinnedPeer::new(a.fingerprint, &provider, "test")))
            .with_cert_resolver(stolen_identity(&b, &mallory));
        let a_ctx = pinned(&a, b.fingerprint);
        let (server, client) = session(TlsAcceptor::from(Arc::new(fake_b)), a_ctx.connector());
        let client = client.expect_err("a must refuse a server without b's key");
        assert!(client.contains("client handshake"), "{client}");
        assert!(client.contains("BadSignature"), "{client}");
        server.expect_err("the impostor's handshake must fail too");

        // Mallory presents a's certificate to b, which pins a.
        let fake_a = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedPeer::new(
                b.fingerprint,
                &provider,
                "test",
            )))
            .with_client_cert_resolver(stolen_identity(&a, &mallory));
        let b_ctx = pinned(&b, a.fingerprint);
        let (server, client) = session(b_ctx.acceptor(), TlsConnector::from(Arc::new(fake_a)));
        let server = server.expect_err("b must refuse a client without a's key");
        assert!(server.contains("server handshake"), "{server}");
        assert!(server.contains("BadSignature"), "{server}");
        client.expect_err("the impostor must see the refusal");
    }

    struct TestCa {
        params: CertificateParams,
        key: KeyPair,
        cert: PathBuf,
    }

    fn test_ca(dir: &Path) -> TestCa {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "rewind test CA");
        let cert = params.self_signed(&key).expect("CA certificate");
        let path = dir.join("ca.crt");
        fs::write(&path, cert.pem()).expect("write CA certificate");
        TestCa {
            params,
            key,
            cert: path,
        }
    }

    /// A node certificate signed by the CA, usable both as client and as
    /// server, as every node is both.
    fn ca_signed(dir: &Path, ca: &TestCa, name: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("node key");
        let mut params = CertificateParams::new(vec![name.to_owned()]).expect("node params");
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = Issuer::from_params(&ca.params, &ca.key);
        let cert = params
            .signed_by(&key, &issuer)
            .expect("sign node certificate");
        let cert_path = dir.join(format!("{name}.crt"));
        let key_path = dir.join(format!("{name}.key"));
        fs::write(&cert_path, cert.pem()).expect("write node certificate");
        fs::write(&key_path, key.serialize_pem()).expect("write node key");
        (cert_path, key_path)
    }

    #[test]
    fn ca_trust() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = test_ca(dir.path());
        let (a_cert, a_key) = ca_signed(dir.path(), &ca, "ca-node-a");
        let (b_cert, b_key) = ca_signed(dir.path(), &ca, "ca-node-b");
        let a = context(&a_cert, &a_key, PeerTrust::Ca(ca.cert.clone()));
        let b = context(&b_cert, &b_key, PeerTrust::Ca(ca.cert.clone()));

        let (server, client) = session(b.acceptor(), a.connector());
        assert_eq!(server, Ok(()));
        assert_eq!(client, Ok(()));

        // A self-signed node that pins b: b refuses it as a client...
        let rogue = node(dir.path(), "rogue");
        let rogue_ctx = pinned(&rogue, b.own_fingerprint());
        let (server, client) = session(b.acceptor(), rogue_ctx.connector());
        let server = server.expect_err("a certificate not from the CA must be refused");
        assert!(server.contains("UnknownIssuer"), "{server}");
        client.expect_err("the rogue client must see the refusal");

        // ...and a refuses it as a server.
        let rogue_ctx = pinned(&rogue, a.own_fingerprint());
        let (server, client) = session(rogue_ctx.acceptor(), a.connector());
        let client = client.expect_err("a server not from the CA must be refused");
        assert!(client.contains("UnknownIssuer"), "{client}");
        server.expect_err("the rogue server's handshake must fail too");
    }

    #[test]
    fn fingerprint_text_round_trip() {
        let fp = Fingerprint::of(b"not really a certificate");
        let text = fp.to_string();
        assert_eq!(text.len(), 32 * 3 - 1);
        assert_eq!(text, text.to_lowercase());
        assert_eq!(text.parse::<Fingerprint>().expect("own display"), fp);

        let plain: String = text.split(':').collect();
        assert_eq!(plain.parse::<Fingerprint>().expect("plain hex"), fp);
        let upper = plain.to_uppercase();
        assert_eq!(upper.parse::<Fingerprint>().expect("upper case"), fp);
        let prefixed = format!("sha256:{text}");
        assert_eq!(prefixed.parse::<Fingerprint>().expect("prefixed"), fp);
        let prefixed = format!("SHA256:{}", text.to_uppercase());
        assert_eq!(prefixed.parse::<Fingerprint>().expect("openssl style"), fp);
        assert_eq!(format!("{fp:?}"), format!("Fingerprint({text})"));

        let bad = [
            String::new(),
            "sha256:".to_owned(),
            plain[..62].to_owned(),
            format!("{plain}00"),
            format!("{}zz", &plain[..62]),
            format!("{}:", text),
            format!("a{}", &text[1..]).replacen(':', "", 1),
            "md5:00".to_owned(),
        ];
        for input in bad {
            let err = input
                .parse::<Fingerprint>()
                .expect_err("a bad fingerprint must be refused");
            assert!(matches!(err, TlsError::BadFingerprint { .. }), "{err}");
            assert!(err.to_string().contains(&format!("{input:?}")), "{err}");
        }
    }

    #[test]
    fn generated_node_cert() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("certs");
        let made = generate_node_cert(&out, "host_1.example-a").expect("generate");
        assert_eq!(made.cert, out.join("host_1.example-a.crt"));
        assert_eq!(made.key, out.join("host_1.example-a.key"));

        let mode = fs::metadata(&made.key)
            .expect("key metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let certs = load_certs(&made.cert).expect("read the certificate back");
        assert_eq!(certs.len(), 1);
        assert_eq!(Fingerprint::of(&certs[0]), made.fingerprint);
        let ctx = pinned(&made, made.fingerprint);
        assert_eq!(ctx.own_fingerprint(), made.fingerprint);

        let key_before = fs::read(&made.key).expect("read key");
        let err = generate_node_cert(&out, "host_1.example-a").expect_err("must not overwrite");
        assert!(matches!(err, TlsError::KeyExists { .. }), "{err}");
        assert!(err.to_string().contains("host_1.example-a.key"), "{err}");
        assert_eq!(fs::read(&made.key).expect("read key"), key_before);

        for name in ["", "a/b", "a b", "é", &"x".repeat(65)] {
            let err = generate_node_cert(&out, name).expect_err("bad name");
            assert!(
                matches!(err, TlsError::BadNodeName { .. }),
                "{name:?}: {err}"
            );
        }
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = node(dir.path(), "a");
        let b = node(dir.path(), "b");
        let load = |cert: &Path, key: &Path| {
            TlsContext::load(
                &TlsSettings {
                    cert: cert.to_owned(),
                    key: key.to_owned(),
                    trust: PeerTrust::Fingerprint(b.fingerprint),
                },
                "test",
            )
            .expect_err("must not load")
        };

        let missing = dir.path().join("missing.crt");
        let err = load(&missing, &a.key);
        assert!(matches!(err, TlsError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("missing.crt"), "{err}");

        let garbage = dir.path().join("garbage.crt");
        fs::write(&garbage, b"\x30\x82 not pem").expect("write garbage");
        let err = load(&garbage, &a.key);
        assert!(matches!(err, TlsError::NotPem { .. }), "{err}");
        assert!(err.to_string().contains("garbage.crt"), "{err}");

        let err = load(&a.key, &a.key);
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        assert!(err.to_string().contains("a.key"), "{err}");

        let err = load(&a.cert, &a.cert);
        assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err}");
        assert!(err.to_string().contains("a.crt"), "{err}");

        let err = load(&a.cert, &b.key);
        assert!(matches!(err, TlsError::Identity { .. }), "{err}");
        assert!(err.to_string().contains("a.crt"), "{err}");

        let err = TlsContext::load(
            &TlsSettings {
                cert: a.cert.clone(),
                key: a.key.clone(),
                trust: PeerTrust::Ca(a.key.clone()),
            },
            "test",
        )
        .expect_err("a key is no CA file");
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
    }
}
