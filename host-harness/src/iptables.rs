//! `meshroute iptables`: the capture rules of a transparent sidecar, after istio-iptables'
//! conventions (REDIRECT mode): every inbound TCP connection to the pod goes to the inbound
//! capture port, every outbound one to the outbound capture port; the proxy's own traffic
//! (its UID and GID), loopback destinations and excluded ports and ranges are let through.
//!
//! Chain names and rule order are istio-iptables' (tools/istio-iptables, istio/istio
//! 86c9f01f, testdata `*.golden`), so that operators reading `iptables-save` in a meshroute
//! pod see what they know.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::runtime::capture::{INBOUND_PORT, INBOUND_SOURCE, OUTBOUND_PORT};

/// The proxy's user and group in Istio's sidecar image.
pub const PROXY_ID: u32 = 1337;
/// The HBONE port, never captured (istio-iptables always lets it through).
const HBONE_PORT: u16 = 15008;

/// What to capture.
#[derive(Clone, Debug)]
pub struct CaptureRules {
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    /// Inbound destination ports captured: `None` for all (`*`), else these.
    pub include_ports: Option<Vec<u16>>,
    /// Inbound destination ports never captured (with `*`).
    pub exclude_ports: Vec<u16>,
    /// Outbound destination ranges captured: `None` for all (`*`).
    pub include_cidrs: Option<Vec<String>>,
    /// Outbound destination ranges never captured.
    pub exclude_cidrs: Vec<String>,
    /// Outbound destination ports never captured.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination ports captured whatever their range.
    pub include_outbound_ports: Vec<u16>,
}

impl Default for CaptureRules {
    /// Istio's injected defaults: everything captured, the agent's and Envoy's status and
    /// metrics ports (15020, 15021, 15090) and meshroute's admin port (15000) excluded.
    fn default() -> Self {
        Self {
            outbound_port: OUTBOUND_PORT,
            inbound_port: INBOUND_PORT,
            proxy_uid: PROXY_ID,
            proxy_gid: PROXY_ID,
            include_ports: None,
            exclude_ports: vec![15000, 15020, 15021, 15090],
            include_cidrs: None,
            exclude_cidrs: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            include_outbound_ports: Vec::new(),
        }
    }
}

/// Why the rules could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("cannot run {program}: {source} (install Debian's iptables package)")]
    Spawn {
        program: &'static str,
        source: std::io::Error,
    },
    #[error("{program} failed: {stderr}")]
    Failed {
        program: &'static str,
        stderr: String,
    },
}

/// `*` or a comma-separated list of ports.
pub fn parse_ports(what: &str, list: &str) -> Result<Option<Vec<u16>>, IptablesError> {
    let list = list.trim();
    if list == "*" {
        return Ok(None);
    }
    list.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| IptablesError::Invalid {
                    what: what.to_owned(),
                    reason: format!("{p:?} is not a port number (1..65535) or *"),
                })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// `*` or a comma-separated list of IPv4 addresses and CIDR ranges.
pub fn parse_cidrs(what: &str, list: &str) -> Result<Option<Vec<String>>, IptablesError> {
    let list = list.trim();
    if list == "*" {
        return Ok(None);
    }
    list.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            let (ip, len) = c.split_once('/').unwrap_or((c, "32"));
            let valid = ip.parse::<std::net::Ipv4Addr>().is_ok()
                && len.parse::<u8>().is_ok_and(|l| l <= 32);
            if valid {
                Ok(format!("{ip}/{len}"))
            } else {
                Err(IptablesError::Invalid {
                    what: what.to_owned(),
                    reason: format!("{c:?} is not an IPv4 address or CIDR range, or *"),
                })
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

const CHAINS: [&str; 4] = [
    "ISTIO_INBOUND",
    "ISTIO_REDIRECT",
    "ISTIO_IN_REDIRECT",
    "ISTIO_OUTPUT",
];

impl CaptureRules {
    /// The rules in `iptables-restore` form (the `nat` table).
    pub fn restore_script(&self) -> String {
        let mut s = String::from("*nat\n");
        for chain in CHAINS {
            let _ = writeln!(s, "-N {chain}");
        }
        let _ = writeln!(s, "-A ISTIO_INBOUND -p tcp --dport {HBONE_PORT} -j RETURN");
        let _ = writeln!(
            s,
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        );
        let _ = writeln!(
            s,
            "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        );
        // Inbound: everything but the excluded ports, or only the included ones.
        match &self.include_ports {
            None => {
                let _ = writeln!(s, "-A PREROUTING -p tcp -j ISTIO_INBOUND");
                for p in &self.exclude_ports {
                    let _ = writeln!(s, "-A ISTIO_INBOUND -p tcp --dport {p} -j RETURN");
                }
                let _ = writeln!(s, "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT");
            }
            Some(ports) if !ports.is_empty() => {
                let _ = writeln!(s, "-A PREROUTING -p tcp -j ISTIO_INBOUND");
                for p in ports {
                    let _ = writeln!(
                        s,
                        "-A ISTIO_INBOUND -p tcp --dport {p} -j ISTIO_IN_REDIRECT"
                    );
                }
            }
            Some(_) => {}
        }
        let _ = writeln!(s, "-A OUTPUT -j ISTIO_OUTPUT");
        // The proxy's connections to the workload come from this address: never captured.
        let _ = writeln!(s, "-A ISTIO_OUTPUT -o lo -s {INBOUND_SOURCE}/32 -j RETURN");
        for p in &self.exclude_outbound_ports {
            let _ = writeln!(s, "-A ISTIO_OUTPUT -p tcp --dport {p} -j RETURN");
        }
        for (kind, id) in [("uid", self.proxy_uid), ("gid", self.proxy_gid)] {
            // The proxy calling its own pod's address goes in through the inbound side;
            // the application's loopback traffic stays its own; the proxy's other
            // connections leave as they are.
            let _ = writeln!(
                s,
                "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport {HBONE_PORT} -m owner --{kind}-owner {id} -j ISTIO_IN_REDIRECT"
            );
            let _ = writeln!(
                s,
                "-A ISTIO_OUTPUT -o lo -m owner ! --{kind}-owner {id} -j RETURN"
            );
            let _ = writeln!(s, "-A ISTIO_OUTPUT -m owner --{kind}-owner {id} -j RETURN");
        }
        let _ = writeln!(s, "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN");
        for p in &self.include_outbound_ports {
            let _ = writeln!(s, "-A ISTIO_OUTPUT -p tcp --dport {p} -j ISTIO_REDIRECT");
        }
        for c in &self.exclude_cidrs {
            let _ = writeln!(s, "-A ISTIO_OUTPUT -d {c} -j RETURN");
        }
        match &self.include_cidrs {
            None => {
                let _ = writeln!(s, "-A ISTIO_OUTPUT -j ISTIO_REDIRECT");
            }
            Some(cidrs) => {
                for c in cidrs {
                    let _ = writeln!(s, "-A ISTIO_OUTPUT -d {c} -j ISTIO_REDIRECT");
                }
            }
        }
        s.push_str("COMMIT\n");
        s
    }

    /// Installs the rules in the current network namespace, replacing earlier ones.
    pub fn apply(&self) -> Result<(), IptablesError> {
        remove()?;
        let mut child = Command::new("iptables-restore")
            .arg("--noflush")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| IptablesError::Spawn {
                program: "iptables-restore",
                source,
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(self.restore_script().as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|source| IptablesError::Spawn {
                program: "iptables-restore",
                source,
            })?;
        if !out.status.success() {
            return Err(IptablesError::Failed {
                program: "iptables-restore",
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(())
    }
}

/// Removes the capture rules from the current network namespace; rules that are not there
/// are not an error.
pub fn remove() -> Result<(), IptablesError> {
    let iptables = |args: &[&str]| {
        Command::new("iptables")
            .args(["-t", "nat"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|source| IptablesError::Spawn {
                program: "iptables",
                source,
            })
    };
    // Jumps are deleted until none is left (an earlier install may have added several).
    for jump in [
        &["PREROUTING", "-p", "tcp", "-j", "ISTIO_INBOUND"][..],
        &["OUTPUT", "-j", "ISTIO_OUTPUT"][..],
    ] {
        let mut args = vec!["-D"];
        args.extend_from_slice(jump);
        for _ in 0..64 {
            if !iptables(&args)?.success() {
                break;
            }
        }
    }
    for chain in CHAINS {
        let _ = iptables(&["-F", chain])?;
    }
    for chain in CHAINS {
        let _ = iptables(&["-X", chain])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The injected defaults give istio-iptables' rules for `-p 15001 -z 15006 -u 1337
    /// -m REDIRECT -i '*' -b '*'` (its `inbound-ports-wildcard` golden, outbound all).
    #[test]
    fn the_defaults_capture_everything_but_the_proxy_and_loopback() {
        let script = CaptureRules {
            exclude_ports: Vec::new(),
            ..CaptureRules::default()
        }
        .restore_script();
        let expected = "\
*nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
";
        assert_eq!(script, expected);
    }

    /// istio-iptables' `ipnets` and `outbound-ports-include` goldens, and exclusions.
    #[test]
    fn ranges_and_ports_narrow_what_is_captured() {
        let script = CaptureRules {
            include_ports: Some(vec![9080]),
            include_cidrs: Some(vec!["10.0.0.0/8".into()]),
            exclude_cidrs: vec!["10.9.0.0/16".into()],
            exclude_outbound_ports: vec![5432],
            include_outbound_ports: vec![32000],
            ..CaptureRules::default()
        }
        .restore_script();
        for line in [
            "-A ISTIO_INBOUND -p tcp --dport 9080 -j ISTIO_IN_REDIRECT",
            "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT",
            "-A ISTIO_OUTPUT -d 10.9.0.0/16 -j RETURN",
            "-A ISTIO_OUTPUT -p tcp --dport 5432 -j RETURN",
            "-A ISTIO_OUTPUT -p tcp --dport 32000 -j ISTIO_REDIRECT",
        ] {
            assert!(script.contains(line), "{line} missing from\n{script}");
        }
        assert!(!script.contains("-A ISTIO_OUTPUT -j ISTIO_REDIRECT"));
        assert!(!script.contains("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT"));
        // Exclusions come before the catch-all redirect.
        let at = |l: &str| script.find(l).unwrap_or(usize::MAX);
        assert!(at("-d 10.9.0.0/16 -j RETURN") < at("-d 10.0.0.0/8 -j ISTIO_REDIRECT"));
        // The status ports are let through before inbound traffic is redirected.
        let default = CaptureRules::default().restore_script();
        let at = |l: &str| default.find(l).unwrap_or(usize::MAX);
        assert!(
            at("-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN")
                < at("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT")
        );
    }

    #[test]
    fn lists_parse_or_say_what_is_wrong() {
        assert_eq!(parse_ports("p", "*").ok(), Some(None));
        assert_eq!(parse_ports("p", "80, 443").ok(), Some(Some(vec![80, 443])));
        assert_eq!(parse_ports("p", "").ok(), Some(Some(vec![])));
        let e = parse_ports("--include-ports", "80,http")
            .map(|_| ())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--include-ports: \"http\" is not a port number (1..65535) or *"
        );
        assert_eq!(
            parse_cidrs("c", "10.0.0.0/8,10.1.2.3").ok(),
            Some(Some(vec!["10.0.0.0/8".into(), "10.1.2.3/32".into()]))
        );
        assert!(parse_cidrs("c", "10.0.0.0/33").is_err());
        assert!(parse_cidrs("c", "example.com").is_err());
    }
}
