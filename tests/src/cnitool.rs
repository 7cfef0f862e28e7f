//! A small CNI runtime, like upstream's `cnitool`: it executes a network configuration list
//! the way libcni does. Plugins are found by `type` in `CNI_PATH`, get `CNI_COMMAND`,
//! `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS` and `CNI_PATH`, and read their
//! request configuration on stdin: the plugin object with the list's `name` and selected
//! `cniVersion` injected, `runtimeConfig` from the plugin's `capabilities` and the
//! runtime's capability arguments, `prevResult` chained through ADD and the cached final
//! result on CHECK and DEL. DEL runs the plugins in reverse order; CHECK honours
//! `disableCheck`; GC (`disableGC`) first deletes cached attachments that are no longer
//! valid, then sends `cni.dev/valid-attachments` to every plugin and collects all errors.
//! Plugins can run inside a node namespace (`ip netns exec NODE`).

use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A runtime or plugin failure.
#[derive(Debug, thiserror::Error)]
pub enum CniRunError {
    /// The configuration list is unusable.
    #[error("network configuration list: {0}")]
    Config(String),
    /// No plugin binary named `type` in `CNI_PATH`.
    #[error("plugin {0:?} not found in CNI_PATH")]
    NotFound(String),
    /// Starting or talking to the plugin failed.
    #[error("running plugin {plugin}: {msg}")]
    Exec {
        /// The plugin type.
        plugin: String,
        /// What went wrong.
        msg: String,
    },
    /// The plugin reported an error result.
    #[error("plugin {} {}: code {}: {} ({})", .0.plugin, .0.command, .0.code, .0.msg, .0.details)]
    Plugin(Box<PluginFailure>),
}

/// An error result a plugin printed.
#[derive(Debug)]
pub struct PluginFailure {
    /// The plugin type.
    pub plugin: String,
    /// The verb.
    pub command: String,
    /// The error code.
    pub code: u64,
    /// `msg`.
    pub msg: String,
    /// `details`.
    pub details: String,
    /// The whole error object.
    pub raw: Value,
}

impl CniRunError {
    /// The CNI error code, when the plugin reported one.
    pub fn code(&self) -> Option<u64> {
        match self {
            CniRunError::Plugin(f) => Some(f.code),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, CniRunError>;

/// The per-attachment parameters.
#[derive(Debug, Clone, Default)]
pub struct Attachment {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS` (a path).
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS` pairs.
    pub args: Vec<(String, String)>,
    /// Capability arguments (`portMappings`, `mac`, …) for `runtimeConfig`.
    pub capability_args: Map<String, Value>,
}

impl Attachment {
    /// An attachment of `container_id` in the namespace at `netns` as `ifname`.
    pub fn new(container_id: &str, netns: &str, ifname: &str) -> Attachment {
        Attachment {
            container_id: container_id.to_owned(),
            netns: netns.to_owned(),
            ifname: ifname.to_owned(),
            ..Attachment::default()
        }
    }

    /// Adds a `CNI_ARGS` pair.
    pub fn arg(mut self, k: &str, v: &str) -> Attachment {
        self.args.push((k.to_owned(), v.to_owned()));
        self
    }

    /// Adds a capability argument.
    pub fn capability(mut self, k: &str, v: Value) -> Attachment {
        self.capability_args.insert(k.to_owned(), v);
        self
    }

    fn cni_args(&self) -> String {
        self.args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }
}

/// A CNI runtime for one network configuration list.
#[derive(Debug, Clone)]
pub struct CniRuntime {
    conflist: Value,
    name: String,
    version: String,
    cni_path: Vec<PathBuf>,
    node: Option<String>,
    cache_dir: PathBuf,
}

/// Parses `a.b.c` for ordering.
fn semver(v: &str) -> Option<(u64, u64, u64)> {
    let mut it = v.split('.').map(|p| p.parse::<u64>().ok());
    Some((it.next()??, it.next()??, it.next()??))
}

impl CniRuntime {
    /// A runtime for `conflist`, finding plugins in `cni_path` and caching ADD results in
    /// `cache_dir`. The protocol version is the highest of `cniVersion` and `cniVersions`.
    pub fn new(conflist: Value, cni_path: &[PathBuf], cache_dir: &Path) -> Result<CniRuntime> {
        let name = conflist["name"]
            .as_str()
            .ok_or_else(|| CniRunError::Config("no name".into()))?
            .to_owned();
        if conflist["plugins"].as_array().is_none_or(|p| p.is_empty()) {
            return Err(CniRunError::Config("no plugins".into()));
        }
        let mut versions: Vec<String> = conflist["cniVersions"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(v) = conflist["cniVersion"].as_str() {
            versions.push(v.to_owned());
        }
        let version = versions
            .into_iter()
            .max_by_key(|v| semver(v))
            .ok_or_else(|| CniRunError::Config("no cniVersion".into()))?;
        std::fs::create_dir_all(cache_dir).map_err(|e| CniRunError::Config(e.to_string()))?;
        Ok(CniRuntime {
            conflist,
            name,
            version,
            cni_path: cni_path.to_vec(),
            node: None,
            cache_dir: cache_dir.to_owned(),
        })
    }

    /// Runs every plugin inside the network namespace `node` (`ip netns exec NODE`).
    pub fn in_netns(mut self, node: &str) -> CniRuntime {
        self.node = Some(node.to_owned());
        self
    }

    /// The selected protocol version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The plugin objects of the list, in order.
    pub fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn find(&self, plugin_type: &str) -> Result<PathBuf> {
        self.cni_path
            .iter()
            .map(|d| d.join(plugin_type))
            .find(|p| p.is_file())
            .ok_or_else(|| CniRunError::NotFound(plugin_type.to_owned()))
    }

    /// The request configuration for one plugin.
    pub fn request_config(
        &self,
        plugin: &Value,
        attachment: Option<&Attachment>,
        prev_result: Option<&Value>,
    ) -> Value {
        let mut conf = plugin.clone();
        let caps = conf
            .as_object_mut()
            .and_then(|o| o.remove("capabilities"))
            .unwrap_or(Value::Null);
        conf["cniVersion"] = json!(self.version);
        conf["name"] = json!(self.name);
        if let Some(a) = attachment {
            let mut rc = Map::new();
            if let Some(caps) = caps.as_object() {
                for (k, enabled) in caps {
                    if enabled.as_bool() == Some(true) {
                        if let Some(v) = a.capability_args.get(k) {
                            rc.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
            if !rc.is_empty() {
                conf["runtimeConfig"] = Value::Object(rc);
            }
        }
        if let Some(prev) = prev_result {
            conf["prevResult"] = prev.clone();
        }
        conf
    }

    fn command(&self, bin: &Path, verb: &str, attachment: Option<&Attachment>) -> Command {
        let mut cmd = match &self.node {
            Some(node) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", node]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let path = std::env::join_paths(&self.cni_path).unwrap_or_default();
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("CNI_COMMAND", verb)
            .env("CNI_PATH", path);
        if let Some(a) = attachment {
            cmd.env("CNI_CONTAINERID", &a.container_id)
                .env("CNI_NETNS", &a.netns)
                .env("CNI_IFNAME", &a.ifname)
                .env("CNI_ARGS", a.cni_args());
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Starts `plugin_type` with `verb` and `config` on stdin (already written and closed),
    /// without waiting: for tests that kill plugins mid-operation.
    pub fn spawn_plugin(
        &self,
        plugin_type: &str,
        verb: &str,
        attachment: Option<&Attachment>,
        config: &Value,
    ) -> Result<Child> {
        self.spawn_plugin_raw(plugin_type, verb, attachment, config.to_string().as_bytes())
    }

    /// [`CniRuntime::spawn_plugin`] with arbitrary bytes on stdin (for malformed input).
    pub fn spawn_plugin_raw(
        &self,
        plugin_type: &str,
        verb: &str,
        attachment: Option<&Attachment>,
        stdin_bytes: &[u8],
    ) -> Result<Child> {
        let bin = self.find(plugin_type)?;
        let exec = |msg: String| CniRunError::Exec {
            plugin: plugin_type.to_owned(),
            msg,
        };
        let mut child = self
            .command(&bin, verb, attachment)
            .spawn()
            .map_err(|e| exec(e.to_string()))?;
        let mut stdin = child.stdin.take().ok_or_else(|| exec("no stdin".into()))?;
        // A plugin killed before reading its input closes the pipe; that is not our error.
        let _ = stdin.write_all(stdin_bytes);
        drop(stdin);
        Ok(child)
    }

    /// Waits for a plugin started by [`CniRuntime::spawn_plugin`] and parses its answer:
    /// the JSON on stdout (if any) on success, the error result otherwise.
    pub fn finish(&self, plugin_type: &str, verb: &str, child: Child) -> Result<Option<Value>> {
        let out = child.wait_with_output().map_err(|e| CniRunError::Exec {
            plugin: plugin_type.to_owned(),
            msg: e.to_string(),
        })?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let parsed: Option<Value> = if stdout.trim().is_empty() {
            None
        } else {
            serde_json::from_str(&stdout).ok()
        };
        if out.status.success() {
            if !stdout.trim().is_empty() && parsed.is_none() {
                return Err(CniRunError::Exec {
                    plugin: plugin_type.to_owned(),
                    msg: format!("unparseable output {stdout:?}"),
                });
            }
            return Ok(parsed);
        }
        match parsed {
            Some(e) if e["code"].is_u64() => Err(CniRunError::Plugin(Box::new(PluginFailure {
                plugin: plugin_type.to_owned(),
                command: verb.to_owned(),
                code: e["code"].as_u64().unwrap_or_default(),
                msg: e["msg"].as_str().unwrap_or_default().to_owned(),
                details: e["details"].as_str().unwrap_or_default().to_owned(),
                raw: e,
            }))),
            _ => Err(CniRunError::Exec {
                plugin: plugin_type.to_owned(),
                msg: format!(
                    "{} without an error result; stdout {stdout:?}, stderr {:?}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ),
            }),
        }
    }

    /// Runs one plugin to completion with arbitrary bytes on stdin.
    pub fn exec_plugin_raw(
        &self,
        plugin_type: &str,
        verb: &str,
        attachment: Option<&Attachment>,
        stdin_bytes: &[u8],
    ) -> Result<Option<Value>> {
        let child = self.spawn_plugin_raw(plugin_type, verb, attachment, stdin_bytes)?;
        self.finish(plugin_type, verb, child)
    }

    /// Runs one plugin to completion.
    pub fn exec_plugin(
        &self,
        plugin_type: &str,
        verb: &str,
        attachment: Option<&Attachment>,
        config: &Value,
    ) -> Result<Option<Value>> {
        let child = self.spawn_plugin(plugin_type, verb, attachment, config)?;
        self.finish(plugin_type, verb, child)
    }

    fn plugin_type(plugin: &Value) -> Result<String> {
        plugin["type"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| CniRunError::Config("a plugin without type".into()))
    }

    fn cache_path(&self, a: &Attachment) -> PathBuf {
        self.cache_dir.join(format!(
            "{}-{}-{}.json",
            self.name, a.container_id, a.ifname
        ))
    }

    /// The cached final ADD result of an attachment.
    pub fn cached_result(&self, a: &Attachment) -> Option<Value> {
        let text = std::fs::read_to_string(self.cache_path(a)).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        Some(v["result"].clone())
    }

    /// ADD: every plugin in order, each getting the previous one's result; the final
    /// result is cached and returned.
    pub fn add(&self, a: &Attachment) -> Result<Value> {
        let mut prev: Option<Value> = None;
        for plugin in self.plugins() {
            let t = Self::plugin_type(&plugin)?;
            let conf = self.request_config(&plugin, Some(a), prev.as_ref());
            let result = self.exec_plugin(&t, "ADD", Some(a), &conf)?;
            prev = Some(result.ok_or_else(|| CniRunError::Exec {
                plugin: t,
                msg: "ADD printed no result".into(),
            })?);
        }
        let result = prev.unwrap_or(Value::Null);
        let entry = json!({
            "kind": "cniCacheV1",
            "containerId": a.container_id,
            "ifName": a.ifname,
            "networkName": self.name,
            "netns": a.netns,
            "cniArgs": a.args,
            "capabilityArgs": a.capability_args,
            "result": result,
        });
        std::fs::write(self.cache_path(a), entry.to_string())
            .map_err(|e| CniRunError::Config(format!("caching the result: {e}")))?;
        Ok(result)
    }

    /// CHECK: every plugin in order with the cached result (nothing when `disableCheck`).
    pub fn check(&self, a: &Attachment) -> Result<()> {
        if self.conflist["disableCheck"].as_bool() == Some(true) {
            return Ok(());
        }
        let prev = self.cached_result(a);
        for plugin in self.plugins() {
            let t = Self::plugin_type(&plugin)?;
            let conf = self.request_config(&plugin, Some(a), prev.as_ref());
            self.exec_plugin(&t, "CHECK", Some(a), &conf)?;
        }
        Ok(())
    }

    /// DEL: every plugin in reverse order with the cached result; the cache entry goes
    /// once all succeeded.
    pub fn del(&self, a: &Attachment) -> Result<()> {
        let prev = self.cached_result(a);
        for plugin in self.plugins().iter().rev() {
            let t = Self::plugin_type(plugin)?;
            let conf = self.request_config(plugin, Some(a), prev.as_ref());
            self.exec_plugin(&t, "DEL", Some(a), &conf)?;
        }
        let _ = std::fs::remove_file(self.cache_path(a));
        Ok(())
    }

    /// GC with the still-valid `(container id, ifname)` pairs. Like libcni: cached
    /// attachments not in the list are deleted first, then every plugin gets GC (from
    /// 1.1.0); execution continues past errors, which are all returned.
    pub fn gc(&self, valid: &[(String, String)]) -> std::result::Result<(), Vec<CniRunError>> {
        if self.conflist["disableGC"].as_bool() == Some(true) {
            return Ok(());
        }
        let mut errors = Vec::new();
        let prefix = format!("{}-", self.name);
        for entry in std::fs::read_dir(&self.cache_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with(&prefix) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            let Ok(cached) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            let id = cached["containerId"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let ifname = cached["ifName"].as_str().unwrap_or_default().to_owned();
            if cached["networkName"] != json!(self.name)
                || valid.contains(&(id.clone(), ifname.clone()))
            {
                continue;
            }
            let mut a = Attachment::new(&id, cached["netns"].as_str().unwrap_or_default(), &ifname);
            a.args = serde_json::from_value(cached["cniArgs"].clone()).unwrap_or_default();
            a.capability_args =
                serde_json::from_value(cached["capabilityArgs"].clone()).unwrap_or_default();
            if let Err(e) = self.del(&a) {
                errors.push(e);
            }
        }
        if semver(&self.version) >= Some((1, 1, 0)) {
            let list: Vec<Value> = valid
                .iter()
                .map(|(id, ifname)| json!({"containerID": id, "ifname": ifname}))
                .collect();
            for plugin in self.plugins() {
                let t = match Self::plugin_type(&plugin) {
                    Ok(t) => t,
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                };
                let mut conf = self.request_config(&plugin, None, None);
                conf["cni.dev/valid-attachments"] = json!(list);
                if let Err(e) = self.exec_plugin(&t, "GC", None, &conf) {
                    errors.push(e);
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// STATUS of every plugin, in order; the first error stops.
    pub fn status(&self) -> Result<()> {
        for plugin in self.plugins() {
            let t = Self::plugin_type(&plugin)?;
            let conf = self.request_config(&plugin, None, None);
            self.exec_plugin(&t, "STATUS", None, &conf)?;
        }
        Ok(())
    }

    /// VERSION of one plugin.
    pub fn plugin_version(&self, plugin_type: &str) -> Result<Value> {
        self.exec_plugin(
            plugin_type,
            "VERSION",
            None,
            &json!({"cniVersion": self.version}),
        )?
        .ok_or_else(|| CniRunError::Exec {
            plugin: plugin_type.to_owned(),
            msg: "VERSION printed nothing".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime(conflist: Value) -> CniRuntime {
        let dir = tempfile::tempdir().unwrap();
        CniRuntime::new(conflist, &[], dir.path()).unwrap()
    }

    #[test]
    fn the_highest_listed_version_is_selected() {
        let rt = runtime(
            json!({"cniVersion": "0.4.0", "cniVersions": ["1.0.0", "0.3.1"],
                                "name": "n", "plugins": [{"type": "x"}]}),
        );
        assert_eq!(rt.version(), "1.0.0");
    }

    #[test]
    fn request_configs_get_name_version_runtime_config_and_prev_result() {
        let rt = runtime(json!({"cniVersion": "1.1.0", "name": "n", "plugins": [
            {"type": "portmap", "capabilities": {"portMappings": true, "bandwidth": false}, "snat": true}
        ]}));
        let a = Attachment::new("c", "/run/netns/p", "eth0")
            .capability("portMappings", json!([{"hostPort": 80}]))
            .capability("bandwidth", json!({}))
            .capability("mac", json!("x"));
        let plugin = rt.plugins()[0].clone();
        let prev = json!({"cniVersion": "1.1.0", "ips": []});
        let conf = rt.request_config(&plugin, Some(&a), Some(&prev));
        assert_eq!(
            conf,
            json!({"type": "portmap", "snat": true, "cniVersion": "1.1.0", "name": "n",
                   "runtimeConfig": {"portMappings": [{"hostPort": 80}]}, "prevResult": prev})
        );
        assert_eq!(a.cni_args(), "");
        assert_eq!(
            a.arg("K8S_POD_NAME", "p")
                .arg("K8S_POD_NAMESPACE", "d")
                .cni_args(),
            "K8S_POD_NAME=p;K8S_POD_NAMESPACE=d"
        );
    }
}
