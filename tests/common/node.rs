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
        Self::start_with_cookie(test, None)
    }

    /// [`RabbitNode::start`], with the Erlang `cookie` given (nodes of one cluster share it).
    pub fn start_with_cookie(test: &str, cookie: Option<&str>) -> RabbitNode {
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let dir = std::env::temp_dir().join(format!("wa-sender-rabbit-{test}-{suffix}"));
        std::fs::create_dir_all(dir.join("log")).unwrap();
        if let Some(cookie) = cookie {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.join(".erlang.cookie");
            std::fs::write(&path, cookie).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        }
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
        self.kill();
        std::thread::sleep(down);
        self.launch();
    }

    /// Kills the broker's Erlang VM with SIGKILL and waits until its port is closed.
    pub fn kill(&self) {
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
    }

    /// Starts a node that was killed again, on its data.
    pub fn restart_killed(&self) {
        self.launch();
    }

    /// Its Erlang node name (`wa-…@localhost`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `rabbitmqctl <args>` against this node; its standard output.
    pub fn ctl_output(&self, args: &[&str]) -> String {
        let output = self
            .command("/usr/lib/rabbitmq/bin/rabbitmqctl")
            .args(["-n", &self.name])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .output()
            .expect("rabbitmqctl runs");
        assert!(output.status.success(), "rabbitmqctl {args:?} failed");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Makes this node a member of `first`'s cluster (`stop_app`, `join_cluster`, `start_app`).
    pub fn join(&self, first: &RabbitNode) {
        self.ctl(&["stop_app"]);
        self.ctl(&["join_cluster", &first.name]);
        self.ctl(&["start_app"]);
        self.await_startup();
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

/// A RabbitMQ cluster of a test's own: nodes sharing one cookie, the others joined to the first.
pub struct RabbitCluster {
    /// Its nodes, the first the one the others joined.
    pub nodes: Vec<RabbitNode>,
}

impl RabbitCluster {
    /// Starts `size` nodes and joins them into one cluster; each node's log is copied to
    /// `logs` as `rabbitmq-<i>.log` when the cluster is dropped.
    pub fn start(test: &str, size: usize, logs: &std::path::Path) -> RabbitCluster {
        let cookie = uuid::Uuid::new_v4().simple().to_string().to_uppercase();
        let nodes: Vec<RabbitNode> = (0..size)
            .map(|i| {
                RabbitNode::start_with_cookie(&format!("{test}{i}"), Some(&cookie))
                    .keep_log(logs.join(format!("rabbitmq-{i}.log")))
            })
            .collect();
        for node in &nodes[1..] {
            node.join(&nodes[0]);
        }
        RabbitCluster { nodes }
    }

    /// Every node's AMQP address, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RabbitNode::url).collect()
    }

    /// Messages (ready and unacknowledged) in each queue whose name starts with `prefix`, asked
    /// of the first node that answers.
    pub fn queue_messages(&self, prefix: &str) -> Vec<(String, u64)> {
        for node in &self.nodes {
            if std::net::TcpStream::connect(("127.0.0.1", node.port)).is_ok() {
                return node.queue_messages(prefix);
            }
        }
        panic!("no node of the cluster answers");
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

/// A Redis Cluster of a test's own: `masters` masters with one replica each, on its own ports
/// and directory, every node keeping an append-only file; stopped and removed when dropped.
pub struct RedisCluster {
    dir: PathBuf,
    /// Every node's port, masters first as `redis-cli --cluster create` paired them.
    pub ports: Vec<u16>,
    processes: std::sync::Mutex<Vec<Option<std::process::Child>>>,
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster and waits until every replica has synced with its
    /// master (a replica takes over only after its first sync).
    pub fn start(test: &str, masters: usize) -> RedisCluster {
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let dir = std::env::temp_dir().join(format!("wa-sender-redis-cluster-{test}-{suffix}"));
        let ports: Vec<u16> = (0..masters * 2).map(|_| free_port()).collect();
        let cluster = RedisCluster {
            dir,
            ports,
            processes: std::sync::Mutex::new(Vec::new()),
        };
        for i in 0..cluster.ports.len() {
            let child = cluster.launch(i);
            cluster.processes.lock().unwrap().push(Some(child));
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("redis-cli runs");
        assert!(created.success(), "redis-cli --cluster create failed");
        cluster.await_healthy();
        cluster
    }

    fn launch(&self, i: usize) -> std::process::Child {
        let port = self.ports[i];
        let dir = self.dir.join(port.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-node-timeout", "2000"])
            .args(["--appendonly", "yes", "--save", ""])
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs (is Redis installed?)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return child;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        panic!("the test's Redis node never opened port {port}");
    }

    fn cli(&self, port: u16, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Waits (a minute at most) until the cluster says `cluster_state:ok` on every live node
    /// and every replica's link to its master is up.
    pub fn await_healthy(&self) {
        for _ in 0..600 {
            let live: Vec<u16> = self.live_ports();
            let ok = live.iter().all(|p| {
                let info = self.cli(*p, &["cluster", "info"]);
                let replication = self.cli(*p, &["info", "replication"]);
                info.contains("cluster_state:ok")
                    && (replication.contains("role:master")
                        || replication.contains("master_link_status:up"))
            });
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the test's Redis Cluster never became healthy");
    }

    fn live_ports(&self) -> Vec<u16> {
        let processes = self.processes.lock().unwrap();
        self.ports
            .iter()
            .zip(processes.iter())
            .filter(|(_, p)| p.is_some())
            .map(|(port, _)| *port)
            .collect()
    }

    /// `redis://127.0.0.1:<port>` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The port of the master serving `key`'s slot now.
    pub fn master_of(&self, key: &str) -> u16 {
        let live = self.live_ports();
        let slot: u16 = self
            .cli(live[0], &["cluster", "keyslot", key])
            .trim()
            .parse()
            .expect("a slot");
        let nodes = self.cli(live[0], &["cluster", "nodes"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| match range.split_once('-') {
                Some((a, b)) => {
                    a.parse::<u16>().is_ok_and(|a| a <= slot)
                        && b.parse::<u16>().is_ok_and(|b| slot <= b)
                }
                None => range.parse::<u16>() == Ok(slot),
            });
            if serves {
                let addr = fields[1].split('@').next().unwrap();
                return addr.rsplit(':').next().unwrap().parse().unwrap();
            }
        }
        panic!("no master serves slot {slot}: {nodes}");
    }

    /// Kills the node on `port` with SIGKILL (no goodbye, no last write to its file).
    pub fn kill(&self, port: u16) {
        let i = self.ports.iter().position(|p| *p == port).expect("a node");
        if let Some(mut child) = self.processes.lock().unwrap()[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the node on `port` again on its data; it rejoins as a replica.
    pub fn restart(&self, port: u16) {
        let i = self.ports.iter().position(|p| *p == port).expect("a node");
        let child = self.launch(i);
        self.processes.lock().unwrap()[i] = Some(child);
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in self.processes.lock().unwrap().iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
