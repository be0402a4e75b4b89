//! MCP servers' tools (`[[mcp]]` in gaia.toml), through the official SDK's client (`rmcp`).
//!
//! Each configured server gets a task that keeps it connected: it spawns the server's command
//! (stdio) or opens its streamable-HTTP endpoint, does the MCP handshake, lists the tools
//! (every page), and lists them again when the server says they changed. A server that cannot
//! be reached, or that exits, is retried with backoff (1 s doubling to a minute); its state and
//! last error are shown in `/v1/info`, and a node starts without waiting for its servers.
//!
//! The tools a server lists (only those in its `tools` allow-list when one is given, under
//! its `prefix`) are offered to the model next to `[[tools]]` (which win a name clash), and a
//! call the model makes is executed here with `tools/call`, under the same guards as the
//! HTTPS tools: a timeout, a cap on what goes back to the model, and, for a URL, https unless
//! the host is in `tools_policy.allow_hosts`, with private addresses refused unless it is and
//! the connection pinned to the checked address. A stdio server runs in the data directory with
//! only `PATH`, `HOME`, `LANG` and its `env` in its environment, so it does not see the node's
//! secrets. What a tool returns goes to the model as text: text blocks as they are, other
//! blocks named, and the structured result when there is no text; a result the server marks
//! as an error is an error.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, Implementation,
};
use rmcp::service::{NotificationContext, Peer, RoleClient, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{ClientHandler, ServiceExt};
use serde_json::{Value as Json, json};
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;

use super::tools::{Tool, ToolCallError, resolve_allowed};
use crate::config::{McpConfig, ToolsPolicy, valid_function_name};

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often a connected server is checked for having gone away.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// Most tools taken from one server.
const MAX_TOOLS_PER_SERVER: usize = 64;
/// Longest stderr line of a stdio server copied to the node's log.
const MAX_LOG_LINE: usize = 2048;
/// Variables a stdio server inherits from the node.
const INHERITED_ENV: [&str; 5] = ["PATH", "HOME", "LANG", "LC_ALL", "TMPDIR"];

/// The node's MCP servers.
#[derive(Default)]
pub struct McpHub {
    servers: Vec<Arc<Server>>,
}

/// One configured server.
struct Server {
    config: McpConfig,
    policy: ToolsPolicy,
    cwd: PathBuf,
    /// The running session, when connected.
    live: tokio::sync::Mutex<Option<RunningService<RoleClient, Watch>>>,
    /// What `/v1/info` and the chat plans read.
    view: RwLock<View>,
    /// Set by the server's `tools/list_changed` notification.
    stale: Arc<AtomicBool>,
    /// Wakes the keeper (a list change, a failed call).
    wake: Arc<Notify>,
}

/// A tool as offered: the name the model calls and the server's own.
#[derive(Debug, Clone)]
struct Offered {
    tool: Tool,
    remote: String,
}

#[derive(Debug, Clone, Default)]
struct View {
    state: &'static str,
    error: Option<String>,
    tools: Vec<Offered>,
    /// Listed tools left out: a name the model cannot call.
    skipped: Vec<String>,
    /// The server's own name and version, from the handshake.
    server: Option<String>,
}

/// The client side of a session: notes that the server's tools changed.
#[derive(Clone)]
struct Watch {
    stale: Arc<AtomicBool>,
    wake: Arc<Notify>,
}

impl ClientHandler for Watch {
    fn on_tool_list_changed(
        &self,
        _context: NotificationContext<RoleClient>,
    ) -> impl Future<Output = ()> + Send + '_ {
        self.stale.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        std::future::ready(())
    }

    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("gaia", env!("CARGO_PKG_VERSION")),
        )
    }
}

impl McpHub {
    /// The servers of `configs`, not yet connected ([`McpHub::start`] connects them). Stdio
    /// servers run in `data_dir`.
    pub fn new(configs: &[McpConfig], policy: &ToolsPolicy, data_dir: &Path) -> McpHub {
        let servers = configs
            .iter()
            .map(|config| {
                Arc::new(Server {
                    config: config.clone(),
                    policy: policy.clone(),
                    cwd: data_dir.to_path_buf(),
                    live: tokio::sync::Mutex::new(None),
                    view: RwLock::new(View {
                        state: "connecting",
                        ..View::default()
                    }),
                    stale: Arc::new(AtomicBool::new(false)),
                    wake: Arc::new(Notify::new()),
                })
            })
            .collect();
        McpHub { servers }
    }

    /// Starts a task per server that connects it and keeps it connected (on the current Tokio
    /// runtime). The tasks end when the hub is dropped.
    pub fn start(&self) {
        for server in &self.servers {
            tokio::spawn(keep(Arc::downgrade(server)));
        }
    }

    /// The tools the connected servers offer, in configuration order.
    pub fn tools(&self) -> Vec<Tool> {
        let mut tools = Vec::new();
        for server in &self.servers {
            let view = server.view.read().unwrap_or_else(|p| p.into_inner());
            tools.extend(view.tools.iter().map(|o| o.tool.clone()));
        }
        tools
    }

    /// Runs the MCP tool the model calls `name`; `None` when no server offers it.
    pub async fn call(
        &self,
        name: &str,
        arguments: &Json,
    ) -> Option<Result<String, ToolCallError>> {
        for server in &self.servers {
            let remote = {
                let view = server.view.read().unwrap_or_else(|p| p.into_inner());
                view.tools
                    .iter()
                    .find(|o| o.tool.name == name)
                    .map(|o| o.remote.clone())
            };
            if let Some(remote) = remote {
                return Some(server.call(&remote, arguments).await);
            }
        }
        None
    }

    /// Each server's state for `/v1/info`.
    pub fn status(&self) -> Json {
        Json::Array(
            self.servers
                .iter()
                .map(|s| {
                    let view = s.view.read().unwrap_or_else(|p| p.into_inner());
                    json!({
                        "name": s.config.name,
                        "transport": if s.config.url.is_some() { "streamable-http" } else { "stdio" },
                        "state": view.state,
                        "server": view.server,
                        "tools": view.tools.iter().map(|o| &o.tool.name).collect::<Vec<_>>(),
                        "skipped": view.skipped,
                        "error": view.error,
                    })
                })
                .collect(),
        )
    }
}

/// Keeps `server` connected while it exists.
async fn keep(server: Weak<Server>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let Some(s) = server.upgrade() else { return };
        let wake = Arc::clone(&s.wake);
        let pause = match s.tend().await {
            Ok(()) => {
                backoff = Duration::from_secs(1);
                CHECK_EVERY
            }
            Err(e) => {
                tracing::warn!(server = %s.config.name, "MCP server: {e}; retrying in {backoff:?}");
                s.set_view(|v| {
                    v.state = "failed";
                    v.error = Some(e);
                    v.tools.clear();
                });
                let pause = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                pause
            }
        };
        drop(s);
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

impl Server {
    fn timeout(&self) -> Duration {
        Duration::from_secs(self.config.timeout_secs)
    }

    fn set_view(&self, f: impl FnOnce(&mut View)) {
        f(&mut self.view.write().unwrap_or_else(|p| p.into_inner()));
    }

    /// Connects when not connected, and lists the tools again when they changed.
    async fn tend(&self) -> Result<(), String> {
        let mut live = self.live.lock().await;
        let closed = live
            .as_ref()
            .is_none_or(|service| service.peer().is_transport_closed());
        if closed {
            if live.take().is_some() {
                tracing::warn!(server = %self.config.name, "MCP server went away; reconnecting");
            }
            self.set_view(|v| v.state = "connecting");
            let service = self.connect().await?;
            self.stale.store(false, Ordering::SeqCst);
            let server = service.peer().peer_info().and_then(|i| {
                i.server_info
                    .as_ref()
                    .map(|s| format!("{} {}", s.name, s.version))
            });
            self.list(service.peer()).await?;
            self.set_view(|v| v.server = server);
            *live = Some(service);
        } else if self.stale.swap(false, Ordering::SeqCst)
            && let Some(service) = live.as_ref()
        {
            self.list(service.peer()).await?;
        }
        Ok(())
    }

    /// Opens a session (spawning the command, or over HTTP) and does the handshake.
    async fn connect(&self) -> Result<RunningService<RoleClient, Watch>, String> {
        let handler = Watch {
            stale: Arc::clone(&self.stale),
            wake: Arc::clone(&self.wake),
        };
        let name = &self.config.name;
        let started = match (&self.config.url, self.config.command.split_first()) {
            (Some(url), _) => {
                let client = pinned_client(url, &self.policy, self.timeout()).await?;
                let mut transport_config =
                    StreamableHttpClientTransportConfig::with_uri(url.as_str()).max_sse_event_size(
                        self.config
                            .max_response_bytes
                            .saturating_mul(4)
                            .max(1 << 20),
                    );
                if let Some(token) = &self.config.bearer_token {
                    transport_config = transport_config.auth_header(token.clone());
                }
                let transport =
                    StreamableHttpClientTransport::with_client(client, transport_config);
                tokio::time::timeout(self.timeout(), handler.serve(transport)).await
            }
            (None, Some((program, args))) => {
                let mut command = tokio::process::Command::new(program);
                command.args(args).current_dir(&self.cwd).env_clear();
                for key in INHERITED_ENV {
                    if let Some(value) = std::env::var_os(key) {
                        command.env(key, value);
                    }
                }
                command.envs(&self.config.env).kill_on_drop(true);
                let (transport, stderr) = TokioChildProcess::builder(command)
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .map_err(|e| format!("cannot run {program:?}: {e}"))?;
                if let Some(stderr) = stderr {
                    tokio::spawn(log_stderr(name.clone(), stderr));
                }
                tokio::time::timeout(self.timeout(), handler.serve(transport)).await
            }
            (None, None) => return Err("neither a command nor a url".into()),
        };
        match started {
            Ok(Ok(service)) => Ok(service),
            Ok(Err(e)) => Err(format!("the MCP handshake failed: {e}")),
            Err(_) => Err(format!(
                "no MCP handshake within {} seconds",
                self.config.timeout_secs
            )),
        }
    }

    /// Lists the server's tools and keeps those the model may call.
    async fn list(&self, peer: &Peer<RoleClient>) -> Result<(), String> {
        let listed = tokio::time::timeout(self.timeout(), peer.list_all_tools())
            .await
            .map_err(|_| {
                format!(
                    "tools/list took more than {} seconds",
                    self.config.timeout_secs
                )
            })?
            .map_err(|e| format!("tools/list failed: {e}"))?;
        let (tools, skipped) = offered(&self.config, listed);
        tracing::info!(
            server = %self.config.name,
            "MCP server ready: {} tools ({})",
            tools.len(),
            tools.iter().map(|o| o.tool.name.as_str()).collect::<Vec<_>>().join(", ")
        );
        if !skipped.is_empty() {
            tracing::warn!(server = %self.config.name, "MCP tools left out: {}", skipped.join("; "));
        }
        self.set_view(|v| {
            v.state = "ready";
            v.error = None;
            v.tools = tools;
            v.skipped = skipped;
        });
        Ok(())
    }

    /// Calls the server's tool `remote`.
    async fn call(&self, remote: &str, arguments: &Json) -> Result<String, ToolCallError> {
        let peer = {
            let live = self.live.lock().await;
            live.as_ref().map(|s| s.peer().clone())
        };
        let Some(peer) = peer.filter(|p| !p.is_transport_closed()) else {
            self.wake.notify_one();
            return Err(ToolCallError::Mcp(format!(
                "MCP server {:?} is not connected",
                self.config.name
            )));
        };
        let Json::Object(arguments) = arguments else {
            return Err(ToolCallError::Mcp(
                "the arguments are not a JSON object".into(),
            ));
        };
        let params =
            CallToolRequestParams::new(remote.to_string()).with_arguments(arguments.clone());
        let result = tokio::time::timeout(self.timeout(), peer.call_tool(params))
            .await
            .map_err(|_| ToolCallError::Timeout(self.config.timeout_secs))?;
        let result = result.map_err(|e| {
            self.wake.notify_one();
            ToolCallError::Mcp(format!("MCP server {:?}: {e}", self.config.name))
        })?;
        let text = render(&result);
        if text.len() > self.config.max_response_bytes {
            return Err(ToolCallError::TooLarge(self.config.max_response_bytes));
        }
        if result.is_error == Some(true) {
            return Err(ToolCallError::Reported(text));
        }
        Ok(text)
    }
}

/// The listed tools the model may call under `config` (its allow-list and prefix), and a line
/// for each one left out.
fn offered(config: &McpConfig, listed: Vec<rmcp::model::Tool>) -> (Vec<Offered>, Vec<String>) {
    let mut tools: Vec<Offered> = Vec::new();
    let mut skipped = Vec::new();
    for t in listed {
        let remote = t.name.to_string();
        if !config.tools.is_empty() && !config.tools.contains(&remote) {
            continue;
        }
        let name = format!("{}{remote}", config.prefix);
        if !valid_function_name(&name) {
            skipped.push(format!("{name:?}: a name must be 1 to 64 of [A-Za-z0-9_-]"));
            continue;
        }
        if tools.iter().any(|o| o.tool.name == name) {
            skipped.push(format!("{name:?}: listed twice"));
            continue;
        }
        if tools.len() == MAX_TOOLS_PER_SERVER {
            skipped.push(format!("{name:?}: more than {MAX_TOOLS_PER_SERVER} tools"));
            continue;
        }
        let description = t
            .description
            .as_deref()
            .map(str::to_string)
            .or(t.title.clone())
            .unwrap_or_default();
        tools.push(Offered {
            tool: Tool {
                name,
                description,
                parameters: Json::Object((*t.input_schema).clone()),
                node: true,
            },
            remote,
        });
    }
    (tools, skipped)
}

/// A tool result as the text the model reads.
fn render(result: &CallToolResult) -> String {
    let mut parts = Vec::new();
    for block in &result.content {
        let v = serde_json::to_value(block).unwrap_or(Json::Null);
        let kind = v["type"].as_str().unwrap_or("unknown");
        let part = match kind {
            "text" => v["text"].as_str().unwrap_or_default().to_string(),
            "resource" => match v["resource"]["text"].as_str() {
                Some(text) => text.to_string(),
                None => format!("[resource {}]", v["resource"]["uri"].as_str().unwrap_or("")),
            },
            "resource_link" => format!("[link {}]", v["uri"].as_str().unwrap_or("")),
            other => format!(
                "[{other} content, {}]",
                v["mimeType"].as_str().unwrap_or("unknown type")
            ),
        };
        parts.push(part);
    }
    if parts.is_empty()
        && let Some(structured) = &result.structured_content
    {
        parts.push(structured.to_string());
    }
    parts.join("\n")
}

/// An HTTP client for `url` that may reach only the address checked against `policy`.
async fn pinned_client(
    url: &str,
    policy: &ToolsPolicy,
    timeout: Duration,
) -> Result<reqwest013::Client, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("url {url:?}: {e}"))?;
    let (bare, addr) = resolve_allowed(&parsed, policy)
        .await
        .map_err(|e| e.to_string())?;
    reqwest013::Client::builder()
        .resolve(&bare, addr)
        .redirect(reqwest013::redirect::Policy::none())
        .connect_timeout(timeout)
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))
}

/// Copies a stdio server's stderr to the node's log, a line at a time (lines cut at
/// [`MAX_LOG_LINE`] bytes).
async fn log_stderr(server: String, mut stderr: tokio::process::ChildStderr) {
    let mut buf = vec![0u8; 8192];
    let mut line: Vec<u8> = Vec::new();
    loop {
        let n = match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            if b == b'\n' {
                tracing::info!(server = %server, "MCP server says: {}", String::from_utf8_lossy(&line));
                line.clear();
            } else if line.len() < MAX_LOG_LINE {
                line.push(b);
            }
        }
    }
    if !line.is_empty() {
        tracing::info!(server = %server, "MCP server says: {}", String::from_utf8_lossy(&line));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(names: &[&str]) -> Vec<rmcp::model::Tool> {
        names
            .iter()
            .map(|n| {
                serde_json::from_value(json!({"name": n, "description": format!("does {n}"),
                    "inputSchema": {"type": "object", "properties": {"x": {"type": "string"}}}}))
                .unwrap()
            })
            .collect()
    }

    fn config(tools: &[&str], prefix: &str) -> McpConfig {
        McpConfig {
            name: "m".into(),
            command: vec!["x".into()],
            env: Default::default(),
            url: None,
            bearer_token: None,
            tools: tools.iter().map(|t| t.to_string()).collect(),
            prefix: prefix.into(),
            timeout_secs: 1,
            max_response_bytes: 10,
        }
    }

    #[test]
    fn offers_the_allowed_tools_under_the_prefix_and_names_what_it_leaves_out() {
        let (tools, skipped) = offered(
            &config(&[], "fs_"),
            listed(&["read", "dotted.name", "read"]),
        );
        assert_eq!(tools.len(), 1);
        assert_eq!(tools[0].tool.name, "fs_read");
        assert_eq!(tools[0].remote, "read");
        assert!(tools[0].tool.node);
        assert_eq!(tools[0].tool.description, "does read");
        assert_eq!(
            tools[0].tool.parameters["properties"]["x"]["type"],
            "string"
        );
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(skipped[0].contains("dotted.name"));
        let (tools, _) = offered(&config(&["b"], ""), listed(&["a", "b", "c"]));
        assert_eq!(
            tools
                .iter()
                .map(|o| o.tool.name.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );
    }

    #[test]
    fn results_become_text() {
        let result: CallToolResult = serde_json::from_value(json!({"content": [
            {"type": "text", "text": "21 C"},
            {"type": "image", "data": "AAAA", "mimeType": "image/png"},
            {"type": "resource", "resource": {"uri": "file:///a", "text": "inside"}},
        ]}))
        .unwrap();
        assert_eq!(render(&result), "21 C\n[image content, image/png]\ninside");
        let structured: CallToolResult =
            serde_json::from_value(json!({"content": [], "structuredContent": {"t": 21}})).unwrap();
        assert_eq!(render(&structured), r#"{"t":21}"#);
    }

    #[tokio::test]
    async fn a_url_to_a_private_address_needs_the_allow_list() {
        let policy = ToolsPolicy::default();
        let err = pinned_client("http://127.0.0.1:9/mcp", &policy, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.contains("allow_hosts"), "{err}");
        let allowed = ToolsPolicy {
            allow_hosts: vec!["127.0.0.1".into()],
        };
        pinned_client("http://127.0.0.1:9/mcp", &allowed, Duration::from_secs(1))
            .await
            .unwrap();
    }
}
