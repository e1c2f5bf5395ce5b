//! A RabbitMQ node of a test's own, on its own ports and data directory, for tests that restart
//! the broker: the shared node on 5672 serves every other test in parallel and is never touched.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// A private RabbitMQ node; stopped and its data removed when dropped.
pub struct RabbitNode {
    name: String,
    dir: PathBuf,
    /// Its AMQP port on 127.0.0.1.
    pub port: u16,
    /// Where its log is copied when it is dropped, if anywhere.
    keep_log: Option<PathBuf>,
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl RabbitNode {
    /// Starts a node and waits until it accepts AMQP sessions.
    pub fn start(test: &str) -> RabbitNode {
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let dir = std::env::temp_dir().join(format!("wa-sender-rabbit-{test}-{suffix}"));
        std::fs::create_dir_all(dir.join("log")).unwrap();
        let port = free_port();
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
        )
        .unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        // Its own (empty) environment file: the system one names the shared node.
        std::fs::write(dir.join("rabbitmq-env.conf"), "").unwrap();
        let node = RabbitNode {
            name: format!("wa-{test}-{suffix}@localhost"),
            dir,
            port,
            keep_log: None,
        };
        node.launch();
        node
    }

    fn launch(&self) {
        let status = self
            .command("/usr/lib/rabbitmq/bin/rabbitmq-server")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .arg("-detached")
            .status()
            .expect("rabbitmq-server runs (is RabbitMQ installed?)");
        assert!(status.success(), "rabbitmq-server -detached failed");
        self.await_startup();
    }

    /// Kills the broker's Erlang VM with SIGKILL (no flush, no goodbye to clients), waits
    /// `down`, and starts it again on the same data, as after a crash.
    pub fn kill_and_start(&self, down: Duration) {
        let pid_file = self.dir.join("mnesia").join(format!("{}.pid", self.name));
        let pid = std::fs::read_to_string(&pid_file)
            .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()));
        let killed = Command::new("kill")
            .args(["-KILL", pid.trim()])
            .status()
            .unwrap();
        assert!(killed.success(), "kill -9 {pid}");
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(down);
        self.launch();
    }

    /// A RabbitMQ command pointed at this node, its data and its cookie.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            // The settings deploy/ gives RabbitMQ, so a test's broker recovers as production's.
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/deploy/rabbitmq/advanced.config"
                ),
            )
            .env("HOME", &self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    }

    fn try_ctl(&self, args: &[&str]) -> bool {
        self.command("/usr/lib/rabbitmq/bin/rabbitmqctl")
            .args(["-n", &self.name])
            .args(args)
            .status()
            .expect("rabbitmqctl runs")
            .success()
    }

    fn ctl(&self, args: &[&str]) {
        assert!(self.try_ctl(args), "rabbitmqctl {args:?} failed");
    }

    fn await_startup(&self) {
        // Until the Erlang node registers, rabbitmqctl cannot reach it and fails at once.
        let mut tries = 0;
        while !self.try_ctl(&["await_startup", "--timeout", "120"]) {
            tries += 1;
            assert!(
                tries < 60,
                "the test's RabbitMQ node {} did not start",
                self.name
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        // The port opens with the app; wait for it to take connections too.
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the test's RabbitMQ node never opened port {}", self.port);
    }

    /// Keeps the broker's log at `dest` when the node is dropped (its data is removed).
    pub fn keep_log(mut self, dest: PathBuf) -> Self {
        self.keep_log = Some(dest);
        self
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Messages (ready and unacknowledged) in each queue whose name starts with `prefix`.
    pub fn queue_messages(&self, prefix: &str) -> Vec<(String, u64)> {
        let output = self
            .command("/usr/lib/rabbitmq/bin/rabbitmqctl")
            .args([
                "-n",
                &self.name,
                "list_queues",
                "--quiet",
                "--no-table-headers",
            ])
            .args(["name", "messages"])
            .stdout(std::process::Stdio::piped())
            .output()
            .expect("rabbitmqctl runs");
        assert!(output.status.success(), "rabbitmqctl list_queues failed");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let (name, messages) = line.split_once('\t')?;
                let messages = messages.trim().parse().ok()?;
                name.starts_with(prefix)
                    .then(|| (name.to_owned(), messages))
            })
            .collect()
    }

    /// Restarts the broker application as an operator would (`stop_app`, `start_app`): every
    /// connection is closed and every queue recovers from disk.
    pub fn restart(&self) {
        self.ctl(&["stop_app"]);
        self.ctl(&["start_app"]);
        self.await_startup();
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        if let Some(dest) = &self.keep_log {
            let log = self.dir.join("log").join(format!("{}.log", self.name));
            let _ = std::fs::copy(log, dest);
        }
        let _ = self
            .command("/usr/lib/rabbitmq/bin/rabbitmqctl")
            .args(["-n", &self.name, "stop"])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private Redis with an append-only file, on its own port and directory, for tests that
/// restart it; stopped and its data removed when dropped.
pub struct RedisNode {
    dir: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
    process: std::sync::Mutex<Option<std::process::Child>>,
}

impl RedisNode {
    /// Starts a Redis that persists every write (`appendonly yes`) and waits for its port.
    pub fn start(test: &str) -> RedisNode {
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let dir = std::env::temp_dir().join(format!("wa-sender-redis-{test}-{suffix}"));
        std::fs::create_dir_all(&dir).unwrap();
        let node = RedisNode {
            dir,
            port: free_port(),
            process: std::sync::Mutex::new(None),
        };
        node.launch();
        node
    }

    fn launch(&self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--appendonly", "yes", "--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs (is Redis installed?)");
        *self.process.lock().unwrap() = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the test's Redis never opened port {}", self.port);
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Restarts Redis as an operator would: SIGTERM (it writes its append-only file and exits),
    /// `down` of nothing listening, and a new process on the same data.
    pub fn restart(&self, down: Duration) {
        self.stop();
        std::thread::sleep(down);
        self.launch();
    }

    fn stop(&self) {
        if let Some(mut child) = self.process.lock().unwrap().take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisNode {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
