//! A Kafka broker of a test's own (`scripts/kafka.sh` on free ports), for tests that freeze or
//! stop it: doing that to the shared development broker would break every other test. Stopped
//! and removed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A broker of the test's own, stopped on drop.
pub struct OwnBroker {
    dir: PathBuf,
    port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn kafka_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka.sh")
}

impl OwnBroker {
    /// Starts a broker (512 MiB heap) and waits until it answers, up to 120 s.
    pub fn start(name: &str) -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(streamops_test_support::unique(name));
        let (port, ctrl) = (free_port(), free_port());
        let status = Command::new("bash")
            .arg(kafka_sh())
            .arg("start")
            .arg(&dir)
            .args([port.to_string(), ctrl.to_string()])
            .env("STREAMOPS_KAFKA_HEAP", "512m")
            // After a freeze longer than `broker.session.timeout.ms` (9 s) the controller fences
            // the broker until its next heartbeat; a 5 s heartbeat interval keeps it fenced long
            // enough that the producer's metadata refresh (after `NOT_LEADER_OR_FOLLOWER`) sees
            // the fenced broker missing from the broker list, as in the suite's stall.
            .env("STREAMOPS_KAFKA_PROPS", "broker.heartbeat.interval.ms=5000")
            .status()
            .expect("running scripts/kafka.sh start");
        assert!(
            status.success(),
            "scripts/kafka.sh start failed ({status}): Java and Maven are needed (`make dev-up`)"
        );
        let broker = Self { dir, port };
        let status = Command::new("bash")
            .arg(kafka_sh())
            .args(["ready", &broker.bootstrap(), "120"])
            .status()
            .expect("running scripts/kafka.sh ready");
        assert!(
            status.success(),
            "the test broker did not become ready; see {}",
            broker.dir.join("kafka.log").display()
        );
        broker
    }

    /// Its bootstrap address.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's log (`kafka.log` in its directory).
    pub fn log(&self) -> PathBuf {
        self.dir.join("kafka.log")
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        std::fs::read_to_string(self.dir.join("kafka.pid"))
            .expect("the broker's pid file")
            .trim()
            .parse()
            .expect("a pid")
    }

    /// Sends `sig` (`STOP`, `CONT`, ...) to the broker.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Freezes the broker (SIGSTOP) for `how_long`, then lets it go on (SIGCONT); returns when it
    /// resumed.
    pub async fn freeze(&self, how_long: std::time::Duration) -> std::time::Instant {
        eprintln!("freezing the broker for {how_long:?}");
        self.signal("STOP");
        tokio::time::sleep(how_long).await;
        self.signal("CONT");
        eprintln!("broker resumed");
        std::time::Instant::now()
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        // A frozen broker ignores SIGTERM until it runs again.
        let _ = Command::new("kill")
            .args(["-CONT", &self.pid().to_string()])
            .status();
        let _ = Command::new("bash")
            .arg(kafka_sh())
            .arg("stop")
            .arg(&self.dir)
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
