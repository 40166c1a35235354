//! Helpers for the MQTT integration tests of the source, the sink and the CLI: check that the
//! shared broker is up, start a private mosquitto (TLS, restarts), publish and collect.
//! Test support only; panics with a message naming the fix when something is missing.

use std::io::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// The shared broker started by `scripts/services.sh start`.
pub const BROKER: &str = "mqtt://127.0.0.1:1883";

/// Panics (never skips) when the shared mosquitto is not listening.
pub fn require_broker() {
    if TcpStream::connect_timeout(
        &"127.0.0.1:1883".parse().expect("address"),
        Duration::from_secs(2),
    )
    .is_err()
    {
        panic!(
            "mosquitto is not listening on 127.0.0.1:1883: run `scripts/services.sh start` \
             before the MQTT integration tests"
        );
    }
}

/// A name unique to this test process and call: topics and client ids of parallel tests
/// never collide.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_000)
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// The user running the tests: mosquitto started as root otherwise switches to the
/// `mosquitto` user, which cannot write our temporary directory.
fn current_user() -> String {
    Command::new("id")
        .arg("-un")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "root".into())
}

/// A private mosquitto on its own port and directory, killed on drop.
pub struct Mosquitto {
    pub port: u16,
    pub dir: PathBuf,
    conf: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts mosquitto with persistence, unlimited queues and `extra` config lines appended
    /// (e.g. TLS settings). Without `extra` it listens on plain TCP.
    pub fn start(extra: &str) -> Mosquitto {
        let port = free_port();
        let dir = std::env::temp_dir().join(unique("sluice-mosquitto"));
        std::fs::create_dir_all(dir.join("data")).expect("create broker dir");
        let conf = dir.join("mosquitto.conf");
        let mut f = std::fs::File::create(&conf).expect("write mosquitto.conf");
        let listener = if extra.contains("listener ") {
            String::new()
        } else {
            format!("listener {port} 127.0.0.1\n")
        };
        let extra = extra.replace("{port}", &port.to_string());
        write!(
            f,
            "{listener}user {}\nallow_anonymous true\npersistence true\npersistence_location {}/\n\
             autosave_interval 1\nmax_queued_messages 0\nmax_inflight_messages 0\n\
             log_dest file {}\nlog_type all\n{extra}\n",
            current_user(),
            dir.join("data").display(),
            dir.join("mosquitto.log").display(),
        )
        .expect("write mosquitto.conf");
        let mut m = Mosquitto {
            port,
            dir,
            conf,
            child: None,
        };
        m.restart();
        m
    }

    /// Starts (again) with the same config and data directory.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run mosquitto ({e}): run `scripts/services.sh start` to install it")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                panic!(
                    "private mosquitto did not open port {}; log: {}",
                    self.port,
                    std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops gracefully (SIGTERM: mosquitto saves its persistence file) and waits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Publishes `messages` (topic, payload) at `qos` with a v3.1.1 client and waits until the
/// broker acknowledged all of them (QoS 1/2) or they were written (QoS 0).
pub async fn publish(url: &str, qos: u8, messages: Vec<(String, Bytes)>) {
    let (host, port, _) = crate::parse_url(url).expect("test url");
    let mut o = rumqttc::MqttOptions::new(unique("pub"), host, port);
    o.set_max_packet_size(64 << 20, 64 << 20)
        .set_inflight(1000)
        .set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = rumqttc::AsyncClient::new(o, 1024);
    let q = crate::qos(qos).expect("qos");
    let total = messages.len();
    let sender = tokio::spawn(async move {
        for (t, p) in messages {
            client
                .publish_bytes(t, q, false, p)
                .await
                .expect("queue publish");
        }
        client
    });
    let mut done = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while done < total {
        let ev = tokio::time::timeout_at(deadline, el.poll())
            .await
            .expect("publishing timed out")
            .expect("publisher connection failed");
        use rumqttc::{Event, Outgoing, Packet};
        match ev {
            Event::Outgoing(Outgoing::Publish(_)) if qos == 0 => done += 1,
            Event::Incoming(Packet::PubAck(_)) if qos == 1 => done += 1,
            Event::Incoming(Packet::PubComp(_)) if qos == 2 => done += 1,
            _ => {}
        }
    }
    let client = sender.await.expect("sender task");
    let _ = client.disconnect().await;
    // Drive the DISCONNECT out.
    let _ = tokio::time::timeout(Duration::from_millis(500), el.poll()).await;
}

/// Subscribes to `filter` with a v3.1.1 client and collects messages until `n` arrived or
/// `timeout` passed. Returns (topic, payload, retain).
pub async fn collect(
    url: &str,
    filter: &str,
    n: usize,
    timeout: Duration,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Vec<(String, Bytes, bool)> {
    let (host, port, _) = crate::parse_url(url).expect("test url");
    let mut o = rumqttc::MqttOptions::new(unique("sub"), host, port);
    o.set_max_packet_size(64 << 20, 64 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 64);
    client
        .subscribe(filter, rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let mut ready = Some(ready);
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, el.poll()).await {
            Err(_) => break,
            Ok(Err(e)) => panic!("collector connection failed: {e}"),
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)))) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
            }
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                out.push((p.topic, p.payload, p.retain))
            }
            Ok(Ok(_)) => {}
        }
    }
    out
}

/// Runs `openssl` with `args` in `dir`, panicking with its output on failure.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl CLI is needed for the TLS test");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
