//! Readiness and liveness probes: httpGet and tcpSocket against the pod's address.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A port by number or by the container's port name.
fn port(container: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .or_else(|| name.parse().ok()),
    }
}

/// One probe attempt: Ok(()) on success, Err(reason) otherwise.
pub async fn check(container: &Container, probe: &Probe, ip: Ipv4Addr) -> Result<(), String> {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    let attempt = async {
        if let Some(http) = &probe.http_get {
            let p = port(container, &http.port).ok_or("unknown probe port")?;
            let mut s = TcpStream::connect(SocketAddr::from((ip, p)))
                .await
                .map_err(|e| format!("connect {ip}:{p}: {e}"))?;
            let path = http.path.as_deref().unwrap_or("/");
            let req = format!(
                "GET {path} HTTP/1.0\r\nHost: {ip}:{p}\r\nUser-Agent: kube-probe/localnode\r\n\r\n"
            );
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 64];
            let mut n = 0;
            while n < 12 {
                let r = s.read(&mut buf[n..]).await.map_err(|e| e.to_string())?;
                if r == 0 {
                    break;
                }
                n += r;
            }
            let line = String::from_utf8_lossy(&buf[..n]);
            let code: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("no HTTP status in `{line}`"))?;
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!("HTTP probe failed with statuscode: {code}"))
            }
        } else if let Some(tcp) = &probe.tcp_socket {
            let p = port(container, &tcp.port).ok_or("unknown probe port")?;
            TcpStream::connect(SocketAddr::from((ip, p)))
                .await
                .map(|_| ())
                .map_err(|e| format!("connect {ip}:{p}: {e}"))
        } else if let Some(exec) = &probe.exec {
            let cmd = exec.command.clone().unwrap_or_default();
            let (first, rest) = cmd.split_first().ok_or("empty exec probe")?;
            let status = tokio::process::Command::new(first)
                .args(rest)
                .status()
                .await
                .map_err(|e| e.to_string())?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("exec probe exited with {status}"))
            }
        } else {
            Err("probe without httpGet, tcpSocket or exec is not supported".into())
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("probe timed out after {timeout:?}")),
    }
}
