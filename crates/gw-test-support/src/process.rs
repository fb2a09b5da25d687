//! The built binaries as separate processes (killed on drop).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// Path of a workspace binary next to the running test executable
/// (`target/<profile>/NAME`). `cargo test --workspace` builds them.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/test-xxxx -> target/<profile>/NAME
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    dir.join(name)
}

/// A child process that is killed (by its PID) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    /// Spawns `bin` with `args`, its output going to the test's stderr.
    pub fn spawn(bin: &str, args: &[&str]) -> anyhow::Result<Self> {
        Self::spawn_with_env(bin, args, &[])
    }

    /// [`Proc::spawn`] with extra environment variables.
    pub fn spawn_with_env(bin: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let path = bin_path(bin);
        if !path.exists() {
            anyhow::bail!(
                "{} not built; run `cargo build --workspace` first",
                path.display()
            );
        }
        let child = Command::new(&path)
            .args(args)
            .stdin(Stdio::null())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .spawn()?;
        Ok(Proc {
            child,
            name: bin.to_string(),
        })
    }

    /// Sends a signal (e.g. "TERM", "KILL") to this process only.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status();
    }

    /// Waits for exit, up to `timeout`; kills it if it does not.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Spawns `gw-gateway` with a `ws://127.0.0.1:<ws_port>` listener, an
/// internal listener on `internal` (e.g. `127.0.0.1:0`) and `extra` flags.
pub fn spawn_gateway(
    register: &str,
    secret: &str,
    ws_port: u16,
    internal: &str,
    extra: &[&str],
) -> anyhow::Result<Proc> {
    spawn_gateway_with_env(register, secret, ws_port, internal, extra, &[])
}

/// [`spawn_gateway`] with extra environment variables.
pub fn spawn_gateway_with_env(
    register: &str,
    secret: &str,
    ws_port: u16,
    internal: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<Proc> {
    let listen = format!("ws://127.0.0.1:{ws_port}");
    let mut args = vec![
        "--register",
        register,
        "--secret",
        secret,
        "--listen",
        &listen,
        "--internal",
        internal,
    ];
    args.extend_from_slice(extra);
    Proc::spawn_with_env("gw-gateway", &args, env)
}

/// A free loopback port for a child process to bind. Picked below the
/// kernel's ephemeral range (32768+ by default), so that outgoing
/// connections made meanwhile cannot take it, and never handed out twice
/// by this process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    if NEXT.load(Ordering::Relaxed) == 0 {
        // Different test processes start at different places.
        let start = 20_000 + (std::process::id() % 600) as u16 * 20;
        let _ = NEXT.compare_exchange(0, start, Ordering::Relaxed, Ordering::Relaxed);
    }
    loop {
        let port = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(port < 32_700, "ran out of test ports");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// This process's resident memory (VmRSS) in KiB; 0 if unknown.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
