//! MQTT connection options shared by the `mqtt` source and sink, and a thin layer over
//! rumqttc that hides the difference between its v3.1.1 and v5 clients.
//!
//! ```toml
//! url = "mqtts://abc123-ats.iot.eu-west-1.amazonaws.com:8883"
//! protocol = "v3.1.1"
//! tls = { ca_file = "AmazonRootCA1.pem", cert_file = "device.pem.crt", key_file = "private.pem.key" }
//! ```
//!
//! The options are flattened into each component's table ([`ConnectionConfig`]); [`Connector`]
//! validates them once (URL, certificate files) and then makes rumqttc clients from them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use rumqttc::v5;
pub use rumqttc::QoS;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::config::{ByteSize, HumanDuration, Secret};

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Protocol {
    /// MQTT 5: the broker honours `max_inflight` (Receive Maximum) and `session_expiry`.
    #[default]
    #[serde(rename = "v5")]
    V5,
    /// MQTT 3.1.1 (what most devices and AWS IoT Core speak).
    #[serde(rename = "v3.1.1")]
    V311,
}

/// TLS settings (`tls = { ca_file = "…", cert_file = "…", key_file = "…" }`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA certificate(s) that signed the broker's certificate. Default: the
    /// system's trust store.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (chain), for brokers that require one (AWS IoT Core).
    /// Needs `key_file`. Default: none.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key (PKCS#8, PKCS#1 or SEC1). Default: none.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// ALPN protocols to offer, e.g. ["x-amzn-mqtt-ca"] for AWS IoT Core on port 443.
    /// Default [].
    #[serde(default)]
    pub alpn: Vec<String>,
    /// Accept any server certificate. For tests only: it disables authentication of the
    /// broker. Default false.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// How to reach and log in to the broker; flattened into the source's and sink's tables.
///
/// Not `deny_unknown_fields` itself: serde checks unknown keys in the component that flattens it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ConnectionConfig {
    /// Broker URL: `mqtt://host:1883` (plain TCP) or `mqtts://host:8883` (TLS). The port
    /// defaults to 1883 / 8883. Required.
    pub url: String,
    /// MQTT client id. Must be stable across restarts for a persistent session to survive.
    /// Default: "sluice-<pipeline id>-<component name>".
    #[serde(default)]
    pub client_id: Option<String>,
    /// Protocol version: "v5" (default) or "v3.1.1".
    #[serde(default)]
    pub protocol: Protocol,
    /// Start a clean session. Default: false for the source (the broker keeps the
    /// subscriptions and the unacknowledged messages across disconnects and restarts, which is
    /// what makes acknowledgement after delivery lossless); the sink always uses a clean session.
    #[serde(default)]
    pub clean_session: Option<bool>,
    /// v5 only: how long the broker keeps the session after a disconnect. Default "1d".
    #[serde(default = "default_session_expiry")]
    pub session_expiry: HumanDuration,
    /// Keep-alive interval (PINGREQ when idle; the broker drops the connection after 1.5×).
    /// At least 1 s (v3.1.1) or 5 s (v5). Default "30s".
    #[serde(default = "default_keep_alive")]
    pub keep_alive: HumanDuration,
    /// User name. Default: none.
    #[serde(default)]
    pub username: Option<String>,
    /// Password; write `password = "${MQTT_PASSWORD}"` to take it from the environment.
    /// Printed as `***` by `Debug`. Default: none.
    #[serde(default)]
    pub password: Option<Secret>,
    /// TLS options (`mqtts://` URLs; a `tls` table also turns TLS on for `mqtt://`).
    /// Default: none.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Largest MQTT packet accepted or sent. A bigger incoming message breaks a v3.1.1
    /// connection (and comes back on every reconnect of a persistent session), while a v5
    /// broker drops it: keep this above the largest message and use the decoder's
    /// `max_payload` to dead-letter big ones. Default "16MiB".
    #[serde(default = "default_max_packet_size")]
    pub max_packet_size: ByteSize,
    /// Timeout of TCP + TLS + CONNECT. Default "10s".
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// First delay before reconnecting; doubles (with jitter) up to `reconnect_max`.
    /// Default "100ms".
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min: HumanDuration,
    /// Longest delay between reconnect attempts. Default "30s".
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max: HumanDuration,
}

fn default_session_expiry() -> HumanDuration {
    HumanDuration(Duration::from_secs(24 * 3600))
}
fn default_keep_alive() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_max_packet_size() -> ByteSize {
    ByteSize(16 * 1024 * 1024)
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_reconnect_min() -> HumanDuration {
    HumanDuration(Duration::from_millis(100))
}
fn default_reconnect_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

impl ConnectionConfig {
    /// Options for `url` with every other option at its default.
    pub fn new(url: &str) -> Self {
        ConnectionConfig {
            url: url.to_string(),
            client_id: None,
            protocol: Protocol::default(),
            clean_session: None,
            session_expiry: default_session_expiry(),
            keep_alive: default_keep_alive(),
            username: None,
            password: None,
            tls: None,
            max_packet_size: default_max_packet_size(),
            connect_timeout: default_connect_timeout(),
            reconnect_min: default_reconnect_min(),
            reconnect_max: default_reconnect_max(),
        }
    }
}

/// A configuration problem, naming the option.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OptionError(pub String);

/// `sluice-<pipeline>-<component>`, restricted to characters every broker accepts.
pub fn default_client_id(pipeline_id: &str, component: &str) -> String {
    let raw = format!("sluice-{pipeline_id}-{component}");
    let mut id: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if id.len() > 64 {
        // Keep it readable and unique: a prefix plus a stable hash of the whole name.
        let hash = raw.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        id.truncate(47);
        id = format!("{id}-{hash:016x}");
    }
    id
}

/// Host, port and whether TLS is on, from a broker URL.
pub fn parse_url(url: &str) -> Result<(String, u16, bool), OptionError> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        OptionError(format!(
            "`url` = {url:?}: expected mqtt://host:port or mqtts://host:port"
        ))
    })?;
    let tls = match scheme {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" | "tls" => true,
        other => {
            return Err(OptionError(format!(
                "`url` = {url:?}: unknown scheme {other:?} (use mqtt:// or mqtts://)"
            )))
        }
    };
    let authority = rest.split('/').next().unwrap_or("");
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| OptionError(format!("`url` = {url:?}: unclosed `[`")))?;
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(url, p)?,
            None => default_port,
        };
        (host.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), parse_port(url, p)?),
            None => (authority.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return Err(OptionError(format!("`url` = {url:?}: no host")));
    }
    Ok((host, port, tls))
}

fn parse_port(url: &str, p: &str) -> Result<u16, OptionError> {
    p.parse()
        .map_err(|_| OptionError(format!("`url` = {url:?}: invalid port {p:?}")))
}

/// Capped exponential backoff with full jitter in the upper half: delays of
/// `[d/2, d]` with `d` doubling from `min` to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
            current: min,
        }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = d / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    /// Back to `min` after a successful connection.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

/// Quality of service, as a number in configs.
pub fn qos(level: u8) -> Result<rumqttc::QoS, OptionError> {
    match level {
        0 => Ok(rumqttc::QoS::AtMostOnce),
        1 => Ok(rumqttc::QoS::AtLeastOnce),
        2 => Ok(rumqttc::QoS::ExactlyOnce),
        n => Err(OptionError(format!("`qos` = {n}: must be 0, 1 or 2"))),
    }
}

fn qos_level(q: rumqttc::QoS) -> u8 {
    q as u8
}

fn v5_qos(q: rumqttc::QoS) -> v5::mqttbytes::QoS {
    match q {
        rumqttc::QoS::AtMostOnce => v5::mqttbytes::QoS::AtMostOnce,
        rumqttc::QoS::AtLeastOnce => v5::mqttbytes::QoS::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce => v5::mqttbytes::QoS::ExactlyOnce,
    }
}

fn from_v5_qos(q: v5::mqttbytes::QoS) -> rumqttc::QoS {
    match q {
        v5::mqttbytes::QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
        v5::mqttbytes::QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        v5::mqttbytes::QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    }
}

/// Per-use settings of a client made by [`Connector::client`].
#[derive(Debug, Clone, Copy)]
pub struct ClientSettings {
    pub clean_session: bool,
    /// Acknowledge incoming QoS 1/2 messages only through [`Client::try_ack`].
    pub manual_acks: bool,
    /// Messages the broker may send before we acknowledge (v5 Receive Maximum), and our own
    /// limit of unacknowledged outgoing publishes.
    pub max_inflight: u16,
    /// Capacity of the request channel: must exceed every request that can be waiting at
    /// once (acks of a full in-flight window, subscribes, disconnect).
    pub request_capacity: usize,
}

/// Validated connection options: makes clients.
#[derive(Clone)]
pub struct Connector {
    config: ConnectionConfig,
    client_id: String,
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("client_id", &self.client_id)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Connector {
    /// Validates `config` (URL, TLS files) for component `component` of pipeline `pipeline_id`.
    pub fn new(
        config: &ConnectionConfig,
        pipeline_id: &str,
        component: &str,
    ) -> Result<Self, OptionError> {
        let (host, port, url_tls) = parse_url(&config.url)?;
        let tls = match (&config.tls, url_tls) {
            (None, false) => None,
            (Some(t), _) => Some(Arc::new(tls_config(t)?)),
            (None, true) => Some(Arc::new(tls_config(&TlsConfig::default())?)),
        };
        if config.password.is_some() && config.username.is_none() {
            return Err(OptionError(
                "`password` is set but `username` is not (MQTT sends a password only with a user name)"
                    .into(),
            ));
        }
        let client_id = match &config.client_id {
            Some(id) if id.is_empty() => {
                return Err(OptionError(
                    "`client_id` must not be empty (leave it out for the default)".into(),
                ))
            }
            Some(id) => id.clone(),
            None => default_client_id(pipeline_id, component),
        };
        if config.max_packet_size.0 > u32::MAX as u64 {
            return Err(OptionError("`max_packet_size` must be below 4GiB".into()));
        }
        Ok(Connector {
            config: config.clone(),
            client_id,
            host,
            port,
            tls,
        })
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    pub fn config(&self) -> &ConnectionConfig {
        &self.config
    }

    /// `host:port` for log lines.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// A backoff following `reconnect_min` / `reconnect_max`.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(self.config.reconnect_min.0, self.config.reconnect_max.0)
    }

    /// A new client and its event loop (not connected until polled).
    pub fn client(&self, s: ClientSettings) -> (Client, EventLoop) {
        let c = &self.config;
        let max_packet = c.max_packet_size.0 as usize;
        let timeout = c.connect_timeout.0.as_secs().max(1);
        let keep_alive = c.keep_alive.0.max(Duration::from_secs(1));
        match c.protocol {
            Protocol::V311 => {
                let mut o = rumqttc::MqttOptions::new(&self.client_id, &self.host, self.port);
                o.set_keep_alive(keep_alive)
                    .set_clean_session(s.clean_session)
                    .set_manual_acks(s.manual_acks)
                    .set_max_packet_size(max_packet, max_packet)
                    .set_inflight(s.max_inflight.max(1));
                if let Some(u) = &c.username {
                    o.set_credentials(
                        u,
                        c.password.as_ref().map(Secret::expose).unwrap_or_default(),
                    );
                }
                if let Some(tls) = &self.tls {
                    o.set_transport(rumqttc::Transport::tls_with_config(
                        rumqttc::TlsConfiguration::Rustls(tls.clone()),
                    ));
                }
                let (client, mut el) = rumqttc::AsyncClient::new(o, s.request_capacity);
                let mut net = rumqttc::NetworkOptions::new();
                net.set_connection_timeout(timeout);
                el.set_network_options(net);
                (Client::V4(client), EventLoop::V4(Box::new(el)))
            }
            Protocol::V5 => {
                let mut o = v5::MqttOptions::new(&self.client_id, &self.host, self.port);
                // rumqttc's v5 client panics below 5 s.
                o.set_keep_alive(keep_alive.max(Duration::from_secs(5)))
                    .set_clean_start(s.clean_session)
                    .set_manual_acks(s.manual_acks)
                    .set_max_packet_size(Some(max_packet as u32))
                    .set_receive_maximum(Some(s.max_inflight.max(1)))
                    .set_outgoing_inflight_upper_limit(s.max_inflight.max(1))
                    .set_connection_timeout(timeout);
                if !s.clean_session {
                    let secs = c.session_expiry.0.as_secs().min(u32::MAX as u64) as u32;
                    o.set_session_expiry_interval(Some(secs));
                }
                if let Some(u) = &c.username {
                    o.set_credentials(
                        u,
                        c.password.as_ref().map(Secret::expose).unwrap_or_default(),
                    );
                }
                if let Some(tls) = &self.tls {
                    o.set_transport(rumqttc::Transport::tls_with_config(
                        rumqttc::TlsConfiguration::Rustls(tls.clone()),
                    ));
                }
                let (client, el) = v5::AsyncClient::new(o, s.request_capacity);
                (Client::V5(client), EventLoop::V5(Box::new(el)))
            }
        }
    }
}

fn read_file(option: &str, path: &Path) -> Result<Vec<u8>, OptionError> {
    std::fs::read(path)
        .map_err(|e| OptionError(format!("`tls.{option}` = {}: {e}", path.display())))
}

/// Builds the rustls client configuration (ring provider) from the `tls` options.
fn tls_config(t: &TlsConfig) -> Result<rustls::ClientConfig, OptionError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| OptionError(format!("tls: {e}")))?;
    let builder = if t.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &t.ca_file {
            Some(path) => {
                let pem = read_file("ca_file", path)?;
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<_, _>>()
                    .map_err(|e| OptionError(format!("`tls.ca_file` = {}: {e}", path.display())))?;
                if certs.is_empty() {
                    return Err(OptionError(format!(
                        "`tls.ca_file` = {}: no PEM certificate in the file",
                        path.display()
                    )));
                }
                for cert in certs {
                    roots.add(cert).map_err(|e| {
                        OptionError(format!("`tls.ca_file` = {}: {e}", path.display()))
                    })?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    return Err(OptionError(
                        "tls: no system CA certificates found; set `tls.ca_file`".into(),
                    ));
                }
            }
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match (&t.cert_file, &t.key_file) {
        (Some(cert), Some(key)) => {
            let pem = read_file("cert_file", cert)?;
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| OptionError(format!("`tls.cert_file` = {}: {e}", cert.display())))?;
            if chain.is_empty() {
                return Err(OptionError(format!(
                    "`tls.cert_file` = {}: no PEM certificate in the file",
                    cert.display()
                )));
            }
            let key_pem = read_file("key_file", key)?;
            let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                OptionError(format!(
                    "`tls.key_file` = {}: no usable private key ({e})",
                    key.display()
                ))
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| OptionError(format!("`tls.cert_file` / `tls.key_file`: {e}")))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(OptionError(
                "`tls.cert_file` and `tls.key_file` must be set together".into(),
            ))
        }
    };
    config.alpn_protocols = t.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(config)
}

/// `insecure_skip_verify`: accepts any certificate but still checks handshake signatures.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An incoming application message.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub pkid: u16,
    pub dup: bool,
}

/// What the event loop reports, the same for both protocol versions.
#[derive(Debug)]
pub enum Event {
    /// Connected (the CONNACK).
    Connected { session_present: bool },
    /// An application message arrived.
    Publish(Message),
    /// The broker answered a SUBSCRIBE; `refused` lists the filters it refused (by index).
    SubAck { refused: Vec<usize> },
    /// The broker answered an UNSUBSCRIBE.
    UnsubAck,
    /// Our publish with this packet id (0 for QoS 0) was written to the socket.
    PublishSent(u16),
    /// QoS 1 publish acknowledged (PUBACK); `refused` holds the reason when a v5 broker
    /// answered with a failure code (e.g. "NotAuthorized"): the message was not accepted.
    PubAck { pkid: u16, refused: Option<String> },
    /// QoS 2 publish completed (PUBCOMP); `refused` as for [`Event::PubAck`].
    PubComp { pkid: u16, refused: Option<String> },
    /// We sent PUBACK for incoming QoS 1 message `pkid`.
    PubAckSent(u16),
    /// We sent PUBREC for incoming QoS 2 message `pkid` (PUBREL / PUBCOMP still to come).
    PubRecSent(u16),
    /// We sent PUBCOMP: incoming QoS 2 message `pkid` is complete.
    PubCompSent(u16),
    /// We sent DISCONNECT.
    DisconnectSent,
    /// The broker sent DISCONNECT (v5).
    DisconnectReceived(String),
    /// Anything else (pings, our own acks, …).
    Other,
}

/// A connection error, and whether retrying cannot help without a config change.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ConnectionError {
    pub message: String,
    /// Refused by the broker (bad credentials, not authorized) or a TLS failure.
    pub permanent: bool,
}

fn classify(message: String, refused: bool, tls: bool) -> ConnectionError {
    let lower = message.to_ascii_lowercase();
    let tls_like = tls
        || lower.contains("certificate")
        || lower.contains("alert")
        || lower.contains("handshake");
    let message = if tls_like {
        format!("TLS: {message} (check tls.ca_file, tls.cert_file, tls.key_file and the broker's certificate)")
    } else if refused {
        format!("{message} (check client_id, username/password and the broker's ACLs)")
    } else {
        message
    };
    ConnectionError {
        message,
        permanent: refused || tls_like,
    }
}

/// The polling half of a connection.
pub enum EventLoop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<v5::EventLoop>),
}

impl EventLoop {
    /// Waits for the next event; reconnects when polled again after an error.
    pub async fn poll(&mut self) -> Result<Event, ConnectionError> {
        match self {
            EventLoop::V4(el) => match el.poll().await {
                Ok(ev) => Ok(from_v4(ev)),
                Err(e) => {
                    let refused = matches!(e, rumqttc::ConnectionError::ConnectionRefused(_));
                    let tls = matches!(e, rumqttc::ConnectionError::Tls(_));
                    Err(classify(e.to_string(), refused, tls))
                }
            },
            EventLoop::V5(el) => match el.poll().await {
                Ok(ev) => Ok(from_v5(ev)),
                Err(e) => {
                    let refused = matches!(e, v5::ConnectionError::ConnectionRefused(_));
                    let tls = matches!(e, v5::ConnectionError::Tls(_));
                    Err(classify(e.to_string(), refused, tls))
                }
            },
        }
    }

    /// Events read before the connection failed and not yet returned by `poll`: a PUBACK that
    /// arrived in the same socket read as the close (mosquitto 2.0 closes a v5 connection right
    /// after refusing a publish with a PUBACK reason). A poller takes them after an error, so
    /// that the confirmations are not lost with the connection.
    pub fn take_buffered_events(&mut self) -> Vec<Event> {
        match self {
            EventLoop::V4(el) => el.state.events.drain(..).map(from_v4).collect(),
            EventLoop::V5(el) => el.state.events.drain(..).map(from_v5).collect(),
        }
    }

    /// Whether events read by the last poll are still buffered (the next poll returns at once,
    /// without I/O). Lets a poller hand over a whole read's worth of messages at a time.
    pub fn has_buffered_events(&self) -> bool {
        match self {
            EventLoop::V4(el) => !el.state.events.is_empty(),
            EventLoop::V5(el) => !el.state.events.is_empty(),
        }
    }

    /// Writes the PUBACK (QoS 1) or PUBREC (QoS 2) of each `(qos, pkid)` straight to the
    /// connection, in order, and flushes: `Some(Ok(()))` when all were written.
    ///
    /// Why: rumqttc's event loop takes one queued request per poll but reads up to ten packets
    /// per socket read, so acks queued through the client fall ever further behind a streaming
    /// backlog. Writing them here keeps acks in step with reads. Only MQTT 3.1.1 exposes its
    /// connection; for v5 this returns `None` and acks go through [`Client::try_ack`].
    /// `Some(Err(_))` when there is no connection or the write failed (the broker redelivers).
    pub async fn write_acks(&mut self, acks: &[(u8, u16)]) -> Option<Result<(), String>> {
        let EventLoop::V4(el) = self else {
            return None;
        };
        Some(write_acks_v4(el, acks).await)
    }

    /// Incoming traffic proves the connection alive. A poller that stops reading for a while
    /// (backpressure) leaves the broker's PINGRESP queued behind messages it has not read
    /// yet, and rumqttc would call the next keep-alive tick a missed ping and drop the
    /// connection (losing what QoS 0 had queued). Call this for each message read: only a
    /// connection that stays silent for a whole keep-alive period then fails.
    pub fn saw_traffic(&mut self) {
        match self {
            EventLoop::V4(el) => el.state.await_pingresp = false,
            EventLoop::V5(el) => el.state.await_pingresp = false,
        }
    }

    /// Writes a PINGREQ without reading anything, so that the broker's keep-alive (1.5 ×
    /// `keep_alive` without a packet from us) is met while the poller does not poll
    /// (backpressure). MQTT 3.1.1 only (rumqttc does not expose the v5 connection): `false`
    /// when nothing was written.
    pub async fn ping(&mut self) -> bool {
        let EventLoop::V4(el) = self else {
            return false;
        };
        let Some(network) = el.network.as_mut() else {
            return false;
        };
        network.write(rumqttc::Packet::PingReq).await.is_ok() && network.flush().await.is_ok()
    }

    /// Drops the network connection; the next poll reconnects.
    pub fn drop_connection(&mut self) {
        match self {
            EventLoop::V4(el) => el.clean(),
            EventLoop::V5(el) => el.clean(),
        }
    }
}

async fn write_acks_v4(el: &mut rumqttc::EventLoop, acks: &[(u8, u16)]) -> Result<(), String> {
    use rumqttc::{PubAck, PubRec, Request};
    if el.network.is_none() {
        return Err("not connected".into());
    }
    for &(qos, pkid) in acks {
        let request = match qos {
            1 => Request::PubAck(PubAck::new(pkid)),
            2 => Request::PubRec(PubRec::new(pkid)),
            _ => continue,
        };
        // Updates the protocol state (QoS 2 bookkeeping) and queues the `Outgoing` event.
        let packet = el
            .state
            .handle_outgoing_packet(request)
            .map_err(|e| e.to_string())?;
        if let (Some(packet), Some(network)) = (packet, el.network.as_mut()) {
            network.write(packet).await.map_err(|e| e.to_string())?;
        }
    }
    match el.network.as_mut() {
        Some(network) => network.flush().await.map_err(|e| e.to_string()),
        None => Err("not connected".into()),
    }
}

fn from_v4(ev: rumqttc::Event) -> Event {
    use rumqttc::{Event as E, Outgoing, Packet};
    match ev {
        E::Incoming(Packet::ConnAck(c)) => Event::Connected {
            session_present: c.session_present,
        },
        E::Incoming(Packet::Publish(p)) => Event::Publish(Message {
            topic: p.topic,
            payload: p.payload,
            qos: qos_level(p.qos),
            pkid: p.pkid,
            dup: p.dup,
        }),
        E::Incoming(Packet::SubAck(s)) => Event::SubAck {
            refused: s
                .return_codes
                .iter()
                .enumerate()
                .filter(|(_, c)| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                .map(|(i, _)| i)
                .collect(),
        },
        // v3.1.1 has no reason codes: a broker that refuses a publish drops it silently.
        E::Incoming(Packet::PubAck(a)) => Event::PubAck {
            pkid: a.pkid,
            refused: None,
        },
        E::Incoming(Packet::PubComp(c)) => Event::PubComp {
            pkid: c.pkid,
            refused: None,
        },
        E::Incoming(Packet::UnsubAck(_)) => Event::UnsubAck,
        E::Incoming(Packet::Disconnect) => Event::DisconnectReceived(String::new()),
        E::Outgoing(Outgoing::Publish(pkid)) => Event::PublishSent(pkid),
        E::Outgoing(Outgoing::PubAck(pkid)) => Event::PubAckSent(pkid),
        E::Outgoing(Outgoing::PubRec(pkid)) => Event::PubRecSent(pkid),
        E::Outgoing(Outgoing::PubComp(pkid)) => Event::PubCompSent(pkid),
        E::Outgoing(Outgoing::Disconnect) => Event::DisconnectSent,
        _ => Event::Other,
    }
}

fn from_v5(ev: v5::Event) -> Event {
    use rumqttc::Outgoing;
    use v5::mqttbytes::v5::Packet;
    use v5::Event as E;
    match ev {
        E::Incoming(Packet::ConnAck(c)) => Event::Connected {
            session_present: c.session_present,
        },
        E::Incoming(Packet::Publish(p)) => Event::Publish(Message {
            topic: match String::from_utf8(p.topic.to_vec()) {
                Ok(s) => s,
                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
            },
            payload: p.payload,
            qos: qos_level(from_v5_qos(p.qos)),
            pkid: p.pkid,
            dup: p.dup,
        }),
        E::Incoming(Packet::SubAck(s)) => Event::SubAck {
            refused: s
                .return_codes
                .iter()
                .enumerate()
                .filter(|(_, c)| !matches!(c, v5::mqttbytes::v5::SubscribeReasonCode::Success(_)))
                .map(|(i, _)| i)
                .collect(),
        },
        E::Incoming(Packet::PubAck(a)) => {
            use v5::mqttbytes::v5::PubAckReason as R;
            Event::PubAck {
                pkid: a.pkid,
                refused: (!matches!(a.reason, R::Success | R::NoMatchingSubscribers))
                    .then(|| format!("{:?}", a.reason)),
            }
        }
        E::Incoming(Packet::PubComp(c)) => {
            use v5::mqttbytes::v5::PubCompReason as R;
            Event::PubComp {
                pkid: c.pkid,
                refused: (!matches!(c.reason, R::Success)).then(|| format!("{:?}", c.reason)),
            }
        }
        E::Incoming(Packet::UnsubAck(_)) => Event::UnsubAck,
        E::Incoming(Packet::Disconnect(d)) => {
            Event::DisconnectReceived(format!("{:?}", d.reason_code))
        }
        E::Outgoing(Outgoing::Publish(pkid)) => Event::PublishSent(pkid),
        E::Outgoing(Outgoing::PubAck(pkid)) => Event::PubAckSent(pkid),
        E::Outgoing(Outgoing::PubRec(pkid)) => Event::PubRecSent(pkid),
        E::Outgoing(Outgoing::PubComp(pkid)) => Event::PubCompSent(pkid),
        E::Outgoing(Outgoing::Disconnect) => Event::DisconnectSent,
        _ => Event::Other,
    }
}

/// The request half of a connection: cheap to clone; never blocks (requests that do not fit
/// the channel fail, which the caller sizes against).
#[derive(Clone)]
pub enum Client {
    V4(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

/// A request could not be queued (channel full or event loop gone).
#[derive(Debug, thiserror::Error)]
#[error("MQTT request not queued: {0}")]
pub struct RequestError(String);

impl Client {
    /// Queues the PUBACK (QoS 1) or PUBREC (QoS 2) of message `pkid`.
    pub fn try_ack(&self, qos: u8, pkid: u16) -> Result<(), RequestError> {
        let q = match qos {
            1 => rumqttc::QoS::AtLeastOnce,
            2 => rumqttc::QoS::ExactlyOnce,
            _ => return Ok(()),
        };
        match self {
            Client::V4(c) => {
                let mut p = rumqttc::Publish::new("", q, Vec::new());
                p.pkid = pkid;
                c.try_ack(&p).map_err(|e| RequestError(e.to_string()))
            }
            Client::V5(c) => {
                let mut p = v5::mqttbytes::v5::Publish::new("", v5_qos(q), Bytes::new(), None);
                p.pkid = pkid;
                c.try_ack(&p).map_err(|e| RequestError(e.to_string()))
            }
        }
    }

    /// Queues one SUBSCRIBE for all `filters`.
    pub fn try_subscribe(&self, filters: &[String], q: rumqttc::QoS) -> Result<(), RequestError> {
        match self {
            Client::V4(c) => c
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), q)),
                )
                .map_err(|e| RequestError(e.to_string())),
            Client::V5(c) => c
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|f| v5::mqttbytes::v5::Filter::new(f.clone(), v5_qos(q))),
                )
                .map_err(|e| RequestError(e.to_string())),
        }
    }

    /// Queues an UNSUBSCRIBE of `filter`. The broker handles a connection's packets in order,
    /// so its UNSUBACK proves that everything sent before (acks) was processed.
    pub fn try_unsubscribe(&self, filter: &str) -> Result<(), RequestError> {
        match self {
            Client::V4(c) => c
                .try_unsubscribe(filter)
                .map_err(|e| RequestError(e.to_string())),
            Client::V5(c) => c
                .try_unsubscribe(filter)
                .map_err(|e| RequestError(e.to_string())),
        }
    }

    /// Queues a PUBLISH.
    pub fn try_publish(
        &self,
        topic: String,
        q: rumqttc::QoS,
        retain: bool,
        payload: Bytes,
    ) -> Result<(), RequestError> {
        match self {
            Client::V4(c) => c
                .try_publish(topic, q, retain, payload.to_vec())
                .map_err(|e| RequestError(e.to_string())),
            Client::V5(c) => c
                .try_publish(topic, v5_qos(q), retain, payload)
                .map_err(|e| RequestError(e.to_string())),
        }
    }

    /// Queues a DISCONNECT (the session is kept when it is persistent).
    pub fn try_disconnect(&self) -> Result<(), RequestError> {
        match self {
            Client::V4(c) => c.try_disconnect().map_err(|e| RequestError(e.to_string())),
            Client::V5(c) => c.try_disconnect().map_err(|e| RequestError(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_does_not_print_the_password() {
        let mut c = ConnectionConfig::new("mqtt://localhost");
        c.username = Some("device".into());
        c.password = Some("hunter2".into());
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("password: Some(***)"), "{shown}");
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("mqtt://localhost").expect("ok"),
            ("localhost".into(), 1883, false)
        );
        assert_eq!(
            parse_url("mqtts://a.iot.eu-west-1.amazonaws.com:8883").expect("ok"),
            ("a.iot.eu-west-1.amazonaws.com".into(), 8883, true)
        );
        assert_eq!(
            parse_url("mqtts://host").expect("ok"),
            ("host".into(), 8883, true)
        );
        assert_eq!(
            parse_url("mqtt://[::1]:1884").expect("ok"),
            ("::1".into(), 1884, false)
        );
        assert!(parse_url("http://x").is_err());
        assert!(parse_url("mqtt://x:port").is_err());
        assert!(parse_url("localhost:1883").is_err());
        assert!(parse_url("mqtt://:1883").is_err());
    }

    #[test]
    fn client_ids_are_stable_and_safe() {
        assert_eq!(default_client_id("edge", "mqtt_in"), "sluice-edge-mqtt_in");
        assert_eq!(default_client_id("a b", "c/d"), "sluice-a_b-c_d");
        let long = "x".repeat(100);
        let a = default_client_id(&long, "in");
        assert!(a.len() <= 64, "{a}");
        assert_eq!(a, default_client_id(&long, "in"));
        assert_ne!(a, default_client_id(&long, "in2"));
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[7] >= Duration::from_millis(500) && d[7] <= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn tls_options_are_checked() {
        let mut c = ConnectionConfig::new("mqtts://broker:8883");
        c.tls = Some(TlsConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsConfig::default()
        });
        let err = Connector::new(&c, "p", "in").expect_err("missing file");
        assert!(err.0.contains("tls.ca_file"), "{err}");
        c.tls = Some(TlsConfig {
            cert_file: Some("/x.pem".into()),
            insecure_skip_verify: true,
            ..TlsConfig::default()
        });
        let err = Connector::new(&c, "p", "in").expect_err("cert without key");
        assert!(err.0.contains("must be set together"), "{err}");
    }
}
pub mod testing;
