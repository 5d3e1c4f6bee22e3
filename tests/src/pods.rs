//! Pods made of network namespaces: each pod a namespace with one `eth0` on a bridge that
//! lives in a namespace of its own (the node), names from `/etc/netns/POD/hosts` (which
//! `ip netns exec` mounts over `/etc/hosts`), and processes started inside with `ip netns
//! exec`. Sockets the test itself opens inside a pod come from a thread that entered the
//! pod's namespace. Everything is removed on drop; nothing touches the host's own network.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::Upstream;

/// The bridge's network; pods take addresses from `.2` up.
const SUBNET: [u8; 3] = [10, 77, 0];

fn ip(args: &[&str]) -> Output {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e} (pod tests need iproute2 and root)"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Fails clearly where pods cannot be made (they need root: `make test` runs as root).
pub fn require_root() {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_default();
    assert_eq!(
        uid, "0",
        "pod tests build network namespaces and iptables rules: run them as root"
    );
}

/// A node: the bridge namespace and its pods.
pub struct Node {
    prefix: String,
    node_ns: String,
    pods: Vec<Pod>,
    /// `/etc/hosts` lines every pod gets.
    hosts: Vec<(String, String)>,
    processes: Arc<Mutex<Vec<u32>>>,
}

/// One pod: a network namespace with an address on the node's bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
}

impl Node {
    pub fn new() -> Self {
        require_root();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "mr{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let node_ns = format!("{prefix}-node");
        ip(&["netns", "add", &node_ns]);
        let node = Self {
            prefix,
            node_ns,
            pods: Vec::new(),
            hosts: Vec::new(),
            processes: Arc::new(Mutex::new(Vec::new())),
        };
        let n = node.node_ns.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"]);
        ip(&["-n", n, "link", "add", "br0", "type", "bridge"]);
        let gateway = format!("{}.{}.{}.1/24", SUBNET[0], SUBNET[1], SUBNET[2]);
        ip(&["-n", n, "addr", "add", &gateway, "dev", "br0"]);
        ip(&["-n", n, "link", "set", "br0", "up"]);
        node
    }

    /// Adds a pod named `name` (its address the next on the bridge).
    pub fn pod(&mut self, name: &str) -> Pod {
        let index = self.pods.len() + 2;
        let ns = format!("{}-{name}", self.prefix);
        let address = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], index as u8);
        ip(&["netns", "add", &ns]);
        let veth = format!("v{index}");
        let n = self.node_ns.as_str();
        ip(&[
            "-n", n, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["-n", n, "link", "set", &veth, "master", "br0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        let gateway = format!("{}.{}.{}.1", SUBNET[0], SUBNET[1], SUBNET[2]);
        ip(&["-n", &ns, "route", "add", "default", "via", &gateway]);
        let pod = Pod {
            name: name.to_owned(),
            ns,
            ip: address,
        };
        self.pods.push(pod.clone());
        self.write_hosts();
        pod
    }

    /// Every pod resolves `name` to `address` (a service's VIP, say).
    pub fn host(&mut self, name: &str, address: &str) {
        self.hosts.push((address.to_owned(), name.to_owned()));
        self.write_hosts();
    }

    fn write_hosts(&self) {
        let mut text = String::from("127.0.0.1 localhost\n");
        for (address, name) in &self.hosts {
            text.push_str(&format!("{address} {name}\n"));
        }
        for pod in &self.pods {
            let dir = Path::new("/etc/netns").join(&pod.ns);
            std::fs::create_dir_all(&dir).expect("/etc/netns");
            std::fs::write(dir.join("hosts"), &text).expect("hosts");
        }
    }

    /// Starts `program args` inside `pod` (as the proxy's user when `uid` is given); its
    /// output is collected. Stopped by PID when the node is dropped.
    pub fn spawn(&self, pod: &Pod, uid: Option<u32>, program: &Path, args: &[&str]) -> Process {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &pod.ns]);
        if let Some(uid) = uid {
            command.args([
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
            ]);
        }
        command.arg(program).args(args);
        let process = Process::start(command);
        self.processes
            .lock()
            .expect("processes")
            .push(process.pid());
        process
    }

    /// Runs a command inside `pod` to its end.
    pub fn exec(&self, pod: &Pod, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &pod.ns, program])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"))
    }
}

impl Default for Node {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(pids) = self.processes.lock() {
            for pid in pids.iter() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        for pod in &self.pods {
            let _ = Command::new("ip").args(["netns", "del", &pod.ns]).status();
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&pod.ns));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.node_ns])
            .status();
    }
}

impl Pod {
    /// Runs `f` on a thread inside the pod's network namespace: sockets it opens are the
    /// pod's (and stay so wherever they are used afterwards).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.try_run(f)
            .unwrap_or_else(|e| panic!("pod {}: {e}", self.name))
    }

    /// As `run`; an error when the namespace cannot be entered (it is gone).
    pub fn try_run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        let path = PathBuf::from("/var/run/netns").join(&self.ns);
        thread::spawn(move || {
            let file =
                std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&file),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(|e| format!("setns {}: {e}", path.display()))?;
            Ok(f())
        })
        .join()
        .map_err(|_| "the pod thread panicked".to_owned())?
    }

    /// A listener bound inside the pod.
    pub fn listen(&self, address: SocketAddr) -> TcpListener {
        self.run(move || {
            TcpListener::bind(address).unwrap_or_else(|e| panic!("bind {address}: {e}"))
        })
    }

    /// The test upstream `name` (its JSON reports, controls) as this pod's application on
    /// `address`.
    pub fn upstream(&self, name: &str, address: SocketAddr) -> Upstream {
        let listener = self.listen(address);
        let pod = self.clone();
        let wake = listener.local_addr().expect("addr");
        let wake = if wake.ip().is_unspecified() {
            SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), wake.port())
        } else {
            wake
        };
        Upstream::serve(
            name,
            listener,
            Box::new(move || {
                // Gone with its pod, the listener needs no waking.
                let _ = pod.try_run(move || {
                    let _ = std::net::TcpStream::connect_timeout(&wake, Duration::from_secs(1));
                });
            }),
        )
    }
}

/// A process started in a pod: its PID, its output so far, and how it ended.
pub struct Process {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Process {
    fn start(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let log = Arc::new(Mutex::new(String::new()));
        let readers: Vec<Box<dyn std::io::Read + Send>> = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        .collect();
        for stream in readers {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                use std::io::BufRead as _;
                for line in std::io::BufReader::new(stream)
                    .lines()
                    .map_while(Result::ok)
                {
                    if let Ok(mut l) = log.lock() {
                        l.push_str(&line);
                        l.push('\n');
                    }
                }
            });
        }
        Self { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Sends `signal` (`TERM`, `KILL`) to the process.
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status();
    }

    /// How the process ended, if it has within `within`.
    pub fn wait(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
