//! What a container needs before it starts: its environment (valueFrom resolved through the API),
//! its volumes written into the pod directory, the ServiceAccount token, and /etc/hosts.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, ServiceAccount, Volume};
use kube::{Api, Client};
use serde_json::json;

/// Where the in-cluster config looks for the ServiceAccount credentials.
pub const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// A bind mount into the container's private mount namespace.
#[derive(Debug, Clone)]
pub struct Mount {
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
}

/// Reads ConfigMaps and Secrets once per container start.
pub struct Lookup<'a> {
    client: &'a Client,
    ns: &'a str,
    config_maps: HashMap<String, Option<ConfigMap>>,
    secrets: HashMap<String, Option<Secret>>,
}

impl<'a> Lookup<'a> {
    pub fn new(client: &'a Client, ns: &'a str) -> Self {
        Self {
            client,
            ns,
            config_maps: HashMap::new(),
            secrets: HashMap::new(),
        }
    }

    async fn config_map(&mut self, name: &str) -> Result<Option<&ConfigMap>, String> {
        if !self.config_maps.contains_key(name) {
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), self.ns);
            let cm = api
                .get_opt(name)
                .await
                .map_err(|e| format!("configmap {name}: {e}"))?;
            self.config_maps.insert(name.to_string(), cm);
        }
        Ok(self.config_maps[name].as_ref())
    }

    async fn secret(&mut self, name: &str) -> Result<Option<&Secret>, String> {
        if !self.secrets.contains_key(name) {
            let api: Api<Secret> = Api::namespaced(self.client.clone(), self.ns);
            let s = api
                .get_opt(name)
                .await
                .map_err(|e| format!("secret {name}: {e}"))?;
            self.secrets.insert(name.to_string(), s);
        }
        Ok(self.secrets[name].as_ref())
    }

    /// All keys of a ConfigMap (data and binaryData); None when it does not exist.
    async fn config_map_data(
        &mut self,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
        Ok(self.config_map(name).await?.map(|cm| {
            let mut out: BTreeMap<String, Vec<u8>> = cm
                .data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
                .collect();
            for (k, v) in cm.binary_data.iter().flatten() {
                out.insert(k.clone(), v.0.clone());
            }
            out
        }))
    }

    async fn secret_data(
        &mut self,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
        Ok(self.secret(name).await?.map(|s| {
            let mut out: BTreeMap<String, Vec<u8>> = s
                .data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect();
            for (k, v) in s.string_data.iter().flatten() {
                out.insert(k.clone(), v.clone().into_bytes());
            }
            out
        }))
    }
}

/// The value of a downward-API field path.
pub fn field_value(pod: &Pod, ip: Ipv4Addr, path: &str) -> Result<String, String> {
    let m = &pod.metadata;
    let spec = pod.spec.as_ref();
    let keyed = |prefix: &str, map: Option<&BTreeMap<String, String>>| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.and_then(|m| m.get(key)).cloned().unwrap_or_default())
    };
    Ok(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.podIP" | "status.podIPs" => ip.to_string(),
        "status.hostIP" | "status.hostIPs" => "127.0.0.1".into(),
        _ => {
            if let Some(v) = keyed("metadata.labels['", m.labels.as_ref()) {
                v
            } else if let Some(v) = keyed("metadata.annotations['", m.annotations.as_ref()) {
                v
            } else {
                return Err(format!(
                    "fieldRef {path} is not supported by the local node"
                ));
            }
        }
    })
}

/// Expands `$(VAR)` references to earlier variables, as the kubelet does (`$$` escapes).
fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("$$") {
            out.push('$');
            rest = t;
        } else if let Some(end) = tail.strip_prefix("$(").and_then(|t| t.find(')')) {
            let name = &tail[2..2 + end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&tail[..3 + end]),
            }
            rest = &tail[3 + end..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The container's environment: envFrom, then env with valueFrom resolved through the API.
pub async fn env(
    lookup: &mut Lookup<'_>,
    pod: &Pod,
    container: &Container,
    ip: Ipv4Addr,
) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.config_map_ref {
            lookup.config_map_data(&r.name).await?.ok_or_else(|| {
                (r.optional != Some(true)).then(|| format!("configmap \"{}\" not found", r.name))
            })
        } else if let Some(r) = &from.secret_ref {
            lookup.secret_data(&r.name).await?.ok_or_else(|| {
                (r.optional != Some(true)).then(|| format!("secret \"{}\" not found", r.name))
            })
        } else {
            continue;
        };
        match data {
            Ok(map) => {
                for (k, v) in map {
                    out.push((
                        format!("{prefix}{k}"),
                        String::from_utf8_lossy(&v).into_owned(),
                    ));
                }
            }
            Err(Some(e)) => return Err(e),
            Err(None) => {}
        }
    }
    for var in container.env.iter().flatten() {
        let value = if let Some(src) = &var.value_from {
            if let Some(r) = &src.secret_key_ref {
                let optional = r.optional == Some(true);
                match lookup.secret_data(&r.name).await? {
                    Some(d) => match d.get(&r.key) {
                        Some(v) => String::from_utf8_lossy(v).into_owned(),
                        None if optional => continue,
                        None => {
                            return Err(format!("couldn't find key {} in Secret {}", r.key, r.name))
                        }
                    },
                    None if optional => continue,
                    None => return Err(format!("secret \"{}\" not found", r.name)),
                }
            } else if let Some(r) = &src.config_map_key_ref {
                let optional = r.optional == Some(true);
                match lookup.config_map_data(&r.name).await? {
                    Some(d) => match d.get(&r.key) {
                        Some(v) => String::from_utf8_lossy(v).into_owned(),
                        None if optional => continue,
                        None => {
                            return Err(format!(
                                "couldn't find key {} in ConfigMap {}",
                                r.key, r.name
                            ))
                        }
                    },
                    None if optional => continue,
                    None => return Err(format!("configmap \"{}\" not found", r.name)),
                }
            } else if let Some(f) = &src.field_ref {
                field_value(pod, ip, &f.field_path)?
            } else if let Some(r) = &src.resource_field_ref {
                return Err(format!(
                    "resourceFieldRef {} is not supported by the local node",
                    r.resource
                ));
            } else {
                return Err(format!("env {}: empty valueFrom", var.name));
            }
        } else {
            expand(var.value.as_deref().unwrap_or(""), &out)
        };
        out.push((var.name.clone(), value));
    }
    Ok(out)
}

fn write_file(dir: &Path, rel: &str, data: &[u8]) -> Result<(), String> {
    let rel = rel.trim_start_matches('/');
    if rel.split('/').any(|c| c == "..") {
        return Err(format!("volume path {rel} escapes its volume"));
    }
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let tmp = path.with_extension("localnode-tmp");
    std::fs::write(&tmp, data).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes `keys` (all of `data` when `items` is None) into `dir`.
fn write_items(
    dir: &Path,
    what: &str,
    data: Option<BTreeMap<String, Vec<u8>>>,
    items: Option<&Vec<k8s_openapi::api::core::v1::KeyToPath>>,
    optional: bool,
) -> Result<(), String> {
    let Some(data) = data else {
        return if optional {
            Ok(())
        } else {
            Err(format!("{what} not found"))
        };
    };
    match items {
        Some(items) => {
            for item in items {
                match data.get(&item.key) {
                    Some(v) => write_file(dir, &item.path, v)?,
                    None if optional => {}
                    None => return Err(format!("{what}: no key {}", item.key)),
                }
            }
        }
        None => {
            for (k, v) in &data {
                write_file(dir, k, v)?;
            }
        }
    }
    Ok(())
}

/// Requests a token for the pod's ServiceAccount, bound to the pod (TokenRequest API).
pub async fn service_account_token(
    client: &Client,
    pod: &Pod,
    expiration: i64,
) -> Result<String, String> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    let mut body = json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": expiration},
    });
    // Bound to the pod when the pod names its ServiceAccount (the apiserver refuses to bind a token
    // to a pod whose spec.serviceAccountName differs, and without the ServiceAccount admission
    // plugin an unnamed one stays empty).
    let named = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .is_some_and(|n| !n.is_empty());
    if named {
        body["spec"]["boundObjectRef"] = json!({"apiVersion": "v1", "kind": "Pod",
            "name": pod.metadata.name, "uid": pod.metadata.uid});
    }
    let req = http::Request::post(format!(
        "/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token"
    ))
    .header("content-type", "application/json")
    .body(serde_json::to_vec(&body).map_err(|e| e.to_string())?)
    .map_err(|e| e.to_string())?;
    let resp: serde_json::Value = client
        .request(req)
        .await
        .map_err(|e| format!("TokenRequest for serviceaccount {ns}/{sa}: {e}"))?;
    resp.pointer("/status/token")
        .and_then(|t| t.as_str())
        .map(str::to_string)
        .ok_or_else(|| "TokenRequest answered without a token".into())
}

/// Whether the pod gets the ServiceAccount volume (what the ServiceAccount admission plugin would
/// add): not when the pod or its ServiceAccount opts out, nor when a container mounts something
/// there already.
pub async fn wants_service_account(client: &Client, pod: &Pod) -> Result<bool, String> {
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(false);
    };
    if spec
        .containers
        .iter()
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .any(|m| m.mount_path.trim_end_matches('/') == SA_DIR)
    {
        return Ok(false);
    }
    if let Some(v) = spec.automount_service_account_token {
        return Ok(v);
    }
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = spec
        .service_account_name
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let sa = api
        .get(name)
        .await
        .map_err(|e| format!("serviceaccount {ns}/{name}: {e}"))?;
    Ok(sa.automount_service_account_token != Some(false))
}

/// Writes token, ca.crt (from the namespace's kube-root-ca.crt ConfigMap) and namespace into `dir`.
pub async fn write_service_account(
    client: &Client,
    lookup: &mut Lookup<'_>,
    pod: &Pod,
    dir: &Path,
) -> Result<(), String> {
    let token = service_account_token(client, pod, 3600).await?;
    let ca = lookup
        .config_map_data("kube-root-ca.crt")
        .await?
        .and_then(|d| d.get("ca.crt").cloned())
        .ok_or("configmap kube-root-ca.crt (key ca.crt) not found")?;
    write_file(dir, "token", token.as_bytes())?;
    write_file(dir, "ca.crt", &ca)?;
    write_file(
        dir,
        "namespace",
        pod.metadata
            .namespace
            .as_deref()
            .unwrap_or("default")
            .as_bytes(),
    )
}

/// Materialises one volume under `dir`; returns the directory to mount (a host path for hostPath).
pub async fn volume(
    client: &Client,
    lookup: &mut Lookup<'_>,
    pod: &Pod,
    ip: Ipv4Addr,
    vol: &Volume,
    dir: &Path,
) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if let Some(cm) = &vol.config_map {
        let data = lookup.config_map_data(&cm.name).await?;
        write_items(
            dir,
            &format!("configmap \"{}\"", cm.name),
            data,
            cm.items.as_ref(),
            cm.optional == Some(true),
        )?;
    } else if let Some(s) = &vol.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let data = lookup.secret_data(&name).await?;
        write_items(
            dir,
            &format!("secret \"{name}\""),
            data,
            s.items.as_ref(),
            s.optional == Some(true),
        )?;
    } else if let Some(p) = &vol.projected {
        for src in p.sources.iter().flatten() {
            if let Some(cm) = &src.config_map {
                let data = lookup.config_map_data(&cm.name).await?;
                write_items(
                    dir,
                    &format!("configmap \"{}\"", cm.name),
                    data,
                    cm.items.as_ref(),
                    cm.optional == Some(true),
                )?;
            } else if let Some(s) = &src.secret {
                let data = lookup.secret_data(&s.name).await?;
                write_items(
                    dir,
                    &format!("secret \"{}\"", s.name),
                    data,
                    s.items.as_ref(),
                    s.optional == Some(true),
                )?;
            } else if let Some(t) = &src.service_account_token {
                let token =
                    service_account_token(client, pod, t.expiration_seconds.unwrap_or(3600))
                        .await?;
                write_file(dir, &t.path, token.as_bytes())?;
            } else if let Some(d) = &src.downward_api {
                for item in d.items.iter().flatten() {
                    if let Some(f) = &item.field_ref {
                        write_file(
                            dir,
                            &item.path,
                            field_value(pod, ip, &f.field_path)?.as_bytes(),
                        )?;
                    }
                }
            }
        }
    } else if let Some(d) = &vol.downward_api {
        for item in d.items.iter().flatten() {
            if let Some(f) = &item.field_ref {
                write_file(
                    dir,
                    &item.path,
                    field_value(pod, ip, &f.field_path)?.as_bytes(),
                )?;
            }
        }
    } else if let Some(h) = &vol.host_path {
        return Ok(PathBuf::from(&h.path));
    } else if vol.empty_dir.is_none() {
        return Err(format!(
            "volume {}: only configMap, secret, projected, downwardAPI, emptyDir and hostPath volumes are supported",
            vol.name
        ));
    }
    Ok(dir.to_path_buf())
}

/// The pod's /etc/hosts: localhost, the pod's own name, the node's host aliases, then Services.
pub fn hosts_file(
    pod: &Pod,
    ip: Ipv4Addr,
    aliases: &[(String, String)],
    services: &[(String, String, Ipv4Addr)],
) -> String {
    let name = pod.metadata.name.as_deref().unwrap_or("pod");
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut s = format!(
        "# Written by streamops-localnode for pod {ns}/{name}\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{name}\n"
    );
    for (host, addr) in aliases {
        s.push_str(&format!("{addr}\t{host}\n"));
    }
    for (svc_ns, svc, addr) in services {
        let short = if svc_ns == ns {
            format!(" {svc}")
        } else {
            String::new()
        };
        s.push_str(&format!(
            "{addr}\t{svc}.{svc_ns}.svc.cluster.local {svc}.{svc_ns}.svc {svc}.{svc_ns}{short}\n"
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollar_references_expand_to_earlier_variables_and_double_dollars_escape() {
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(expand("x$(A)y$(B)$$(A)$", &env), "x1y$(B)$(A)$");
    }

    #[test]
    fn field_refs_give_the_pod_name_namespace_ip_and_labels() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n", "labels": {"app": "x"}},
            "spec": {"containers": [], "nodeName": "streamops-local"}
        }))
        .unwrap();
        let ip = Ipv4Addr::new(127, 1, 0, 7);
        assert_eq!(field_value(&pod, ip, "metadata.name").unwrap(), "p");
        assert_eq!(field_value(&pod, ip, "metadata.namespace").unwrap(), "n");
        assert_eq!(field_value(&pod, ip, "status.podIP").unwrap(), "127.1.0.7");
        assert_eq!(
            field_value(&pod, ip, "metadata.labels['app']").unwrap(),
            "x"
        );
        assert_eq!(
            field_value(&pod, ip, "spec.nodeName").unwrap(),
            "streamops-local"
        );
        assert!(field_value(&pod, ip, "status.nope").is_err());
    }

    #[test]
    fn the_hosts_file_maps_aliases_and_services_with_short_names_in_the_same_namespace() {
        let pod: Pod =
            serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "n"}})).unwrap();
        let hosts = hosts_file(
            &pod,
            Ipv4Addr::new(127, 1, 0, 2),
            &[("kafka.streamops-dev".into(), "127.0.0.1".into())],
            &[
                ("n".into(), "svc".into(), Ipv4Addr::new(127, 1, 0, 3)),
                ("m".into(), "other".into(), Ipv4Addr::new(127, 1, 0, 4)),
            ],
        );
        assert!(hosts.contains("127.0.0.1\tkafka.streamops-dev\n"));
        assert!(hosts.contains("127.1.0.3\tsvc.n.svc.cluster.local svc.n.svc svc.n svc\n"));
        assert!(hosts.contains("127.1.0.4\tother.m.svc.cluster.local other.m.svc other.m\n"));
        assert!(hosts.contains("127.1.0.2\tp\n"));
    }
}
