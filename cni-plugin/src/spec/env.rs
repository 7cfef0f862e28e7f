//! The execution protocol's parameters: `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`,
//! `CNI_IFNAME`, `CNI_ARGS`, `CNI_PATH`.

use std::path::PathBuf;

/// A CNI verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach a container.
    Add,
    /// Detach a container (idempotent).
    Del,
    /// Verify an attachment.
    Check,
    /// Remove resources of attachments that are no longer valid.
    Gc,
    /// Report readiness to serve ADD.
    Status,
    /// Report supported versions.
    Version,
}

impl Command {
    /// Parses `CNI_COMMAND`.
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }

    /// The verb as spelled in `CNI_COMMAND`.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Gc => "GC",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
        }
    }
}

/// Invalid or missing protocol parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    /// Required variables are unset or empty.
    #[error("required env variables [{}] missing", .0.join(","))]
    Missing(Vec<&'static str>),
    /// `CNI_COMMAND` names no verb.
    #[error("unknown CNI_COMMAND: {0}")]
    UnknownCommand(String),
    /// A variable has an invalid value.
    #[error("invalid {var} {value:?}: {why}")]
    Invalid {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pairs: Vec<(String, String)>,
}

impl CniArgs {
    /// Parses `FOO=BAR;ABC=123` (empty segments are ignored).
    pub fn parse(s: &str) -> Result<CniArgs, EnvError> {
        let mut pairs = Vec::new();
        for part in s.split(';').filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else {
                return Err(EnvError::Invalid {
                    var: "CNI_ARGS",
                    value: s.to_owned(),
                    why: "every pair must be KEY=VALUE",
                });
            };
            pairs.push((k.to_owned(), v.to_owned()));
        }
        Ok(CniArgs { pairs })
    }

    /// The value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `K8S_POD_NAMESPACE`.
    pub fn pod_namespace(&self) -> Option<&str> {
        self.get("K8S_POD_NAMESPACE").filter(|v| !v.is_empty())
    }

    /// `K8S_POD_NAME`.
    pub fn pod_name(&self) -> Option<&str> {
        self.get("K8S_POD_NAME").filter(|v| !v.is_empty())
    }
}

/// The parameters of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` (required for ADD, DEL, CHECK).
    pub container_id: Option<String>,
    /// `CNI_NETNS` (required for ADD and CHECK, optional for DEL).
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME` (required for ADD, DEL, CHECK).
    pub ifname: Option<String>,
    /// `CNI_ARGS`.
    pub args: CniArgs,
    /// `CNI_PATH` (weir-cni delegates to no other plugin, so it only passes it on).
    pub path: Option<String>,
}

impl CniEnv {
    /// Reads the parameters through `get` (the process environment in `main`).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<CniEnv, EnvError> {
        let var = |name: &str| get(name).filter(|v| !v.is_empty());
        let Some(cmd) = var("CNI_COMMAND") else {
            return Err(EnvError::Missing(vec!["CNI_COMMAND"]));
        };
        let command = Command::parse(&cmd).ok_or(EnvError::UnknownCommand(cmd))?;
        let attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        let needs_netns = matches!(command, Command::Add | Command::Check);
        let env = CniEnv {
            command,
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS").map(PathBuf::from),
            ifname: var("CNI_IFNAME"),
            args: match var("CNI_ARGS") {
                Some(a) if attachment => CniArgs::parse(&a)?,
                _ => CniArgs::default(),
            },
            path: var("CNI_PATH"),
        };
        let mut missing = Vec::new();
        if attachment && env.container_id.is_none() {
            missing.push("CNI_CONTAINERID");
        }
        if needs_netns && env.netns.is_none() {
            missing.push("CNI_NETNS");
        }
        if attachment && env.ifname.is_none() {
            missing.push("CNI_IFNAME");
        }
        if !missing.is_empty() {
            return Err(EnvError::Missing(missing));
        }
        if attachment {
            if let Some(id) = &env.container_id {
                validate_container_id(id)?;
            }
            if let Some(name) = &env.ifname {
                validate_ifname(name)?;
            }
        }
        Ok(env)
    }
}

/// A container ID: not empty, an alphanumeric first character, then alphanumerics, `_`,
/// `.` or `-`.
pub fn validate_container_id(id: &str) -> Result<(), EnvError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(EnvError::Invalid {
            var: "CNI_CONTAINERID",
            value: id.to_owned(),
            why: "must start with an alphanumeric character, followed by alphanumerics, '_', '.' or '-'",
        })
    }
}

/// An interface name: not empty, not `.` or `..`, under 16 bytes, no `/`, `:` or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), EnvError> {
    let why = if name.is_empty() {
        Some("must not be empty")
    } else if name == "." || name == ".." {
        Some("must not be '.' or '..'")
    } else if name.len() > 15 {
        Some("must be shorter than 16 characters")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some("must not contain '/', ':' or whitespace")
    } else {
        None
    };
    match why {
        Some(why) => Err(EnvError::Invalid {
            var: "CNI_IFNAME",
            value: name.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Result<CniEnv, EnvError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn add_needs_container_id_netns_and_ifname_and_names_the_missing_ones() {
        assert_eq!(
            env(&[("CNI_COMMAND", "ADD")]),
            Err(EnvError::Missing(vec![
                "CNI_CONTAINERID",
                "CNI_NETNS",
                "CNI_IFNAME"
            ]))
        );
        assert_eq!(
            env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0")
            ]),
            Err(EnvError::Missing(vec!["CNI_NETNS"]))
        );
    }

    #[test]
    fn del_may_omit_the_netns() {
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap();
        assert_eq!(e.netns, None);
    }

    #[test]
    fn gc_status_and_version_need_only_the_command() {
        for c in ["GC", "STATUS", "VERSION"] {
            assert!(env(&[("CNI_COMMAND", c)]).is_ok(), "{c}");
        }
        assert_eq!(env(&[]), Err(EnvError::Missing(vec!["CNI_COMMAND"])));
        assert_eq!(
            env(&[("CNI_COMMAND", "INIT")]),
            Err(EnvError::UnknownCommand("INIT".into()))
        );
    }

    #[test]
    fn cni_args_yield_the_pod_namespace_and_name() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-0",
            ),
        ])
        .unwrap();
        assert_eq!(e.args.pod_namespace(), Some("demo"));
        assert_eq!(e.args.pod_name(), Some("web-0"));
        assert!(matches!(
            CniArgs::parse("FOO;BAR=1"),
            Err(EnvError::Invalid {
                var: "CNI_ARGS",
                ..
            })
        ));
    }

    #[test]
    fn container_ids_and_interface_names_follow_the_spec_rules() {
        for ok in ["a", "0abc", "a_b.c-d", "4f3c2b1a"] {
            assert!(validate_container_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "_a", "a/b", "a b", "a:b"] {
            assert!(validate_container_id(bad).is_err(), "{bad:?}");
        }
        for ok in ["eth0", "net1", "a.b", "x-y_z", "123456789012345"] {
            assert!(validate_ifname(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "1234567890123456"] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
    }
}
