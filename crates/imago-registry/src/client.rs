//! One registry's distribution API over reqwest: scheme detection, auth (basic and bearer
//! tokens, anonymous ones included), retries with backoff.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::blocking::{Client as Http, RequestBuilder, Response};
use reqwest::header::{AUTHORIZATION, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use serde::Deserialize;

use crate::auth::{Challenge, CredentialSources, Credentials, parse_challenge};
use crate::error::{RegistryError, Result};
use crate::reference::api_host;
use crate::settings::Settings;

/// A connection to one registry (`HOST[:PORT]` as users write it).
pub struct Client {
    pub(crate) settings: Settings,
    pub(crate) registry: String,
    base: reqwest::Url,
    http: Http,
    credentials: Option<Credentials>,
    auth: Mutex<AuthState>,
}

#[derive(Default)]
struct AuthState {
    challenge: Option<Challenge>,
    /// `Authorization` values of bearer tokens by scope.
    tokens: HashMap<String, HeaderValue>,
}

/// What a request is about, for error messages and retries.
pub(crate) struct Target<'a> {
    pub repository: &'a str,
    pub what: String,
    /// Token scopes (`repository:NAME:pull`), empty for `/v2/`.
    pub scopes: Vec<String>,
}

#[derive(Deserialize)]
struct TokenReply {
    token: Option<String>,
    access_token: Option<String>,
}

pub(crate) fn pull_scope(repository: &str) -> String {
    format!("repository:{repository}:pull")
}

pub(crate) fn push_scope(repository: &str) -> String {
    format!("repository:{repository}:pull,push")
}

fn retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// The registry's error text, short and without control characters.
pub(crate) fn error_detail(response: Response) -> String {
    let text = response.text().unwrap_or_default();
    let text: String = text.chars().filter(|c| !c.is_control()).take(300).collect();
    if text.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", text.trim())
    }
}

/// reqwest's error without the URL's query (a token could be in it) and with its causes.
pub(crate) fn describe(error: &reqwest::Error) -> String {
    let mut text = error.without_url_ref().to_string();
    let mut source = std::error::Error::source(error);
    while let Some(s) = source {
        let t = s.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        source = s.source();
    }
    text
}

trait WithoutUrl {
    fn without_url_ref(&self) -> String;
}

impl WithoutUrl for reqwest::Error {
    fn without_url_ref(&self) -> String {
        let mut text = self.to_string();
        if let Some(url) = self.url() {
            text = text.replace(&format!(" ({url})"), "");
            text = text.replace(url.as_str(), "");
        }
        text
    }
}

impl Client {
    /// Connects to `registry`: finds whether it speaks HTTPS (plain HTTP only where
    /// [`Settings::plain_http_allowed`]), and learns its auth challenge.
    pub fn connect(settings: &Settings, registry: &str) -> Result<Client> {
        let sources = CredentialSources::for_home(&settings.home);
        let credentials = sources.lookup(registry)?;
        Client::connect_with(settings, registry, credentials)
    }

    pub fn connect_with(
        settings: &Settings,
        registry: &str,
        credentials: Option<Credentials>,
    ) -> Result<Client> {
        let mut builder = Http::builder()
            .connect_timeout(Duration::from_secs(15))
            .timeout(None::<Duration>)
            .pool_max_idle_per_host(settings.parallel.max(1) * 2)
            .user_agent(concat!("imago/", env!("CARGO_PKG_VERSION")));
        for path in settings.ca_files(registry) {
            let pem = std::fs::read(&path).map_err(|source| RegistryError::Io {
                action: "read",
                path: path.clone(),
                source,
            })?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| RegistryError::Config {
                path: path.clone(),
                reason: format!("not a pem certificate: {}", describe(&e)),
            })?;
            builder = builder.add_root_certificate(cert);
        }
        if settings.is_insecure_listed(registry) {
            builder = builder.danger_accept_invalid_certs(true);
        }
        let http = builder
            .build()
            .map_err(|e| RegistryError::Client(describe(&e)))?;
        let host = api_host(registry);
        let parse = |scheme: &str| {
            reqwest::Url::parse(&format!("{scheme}://{host}/")).map_err(|_| {
                RegistryError::InvalidReference {
                    reference: registry.to_owned(),
                    reason: "not a valid host",
                }
            })
        };
        let https = parse("https")?;
        let http_url = parse("http")?;
        let plain = settings.plain_http_allowed(registry);
        let mut attempt = 0;
        let (base, response) = loop {
            let tls_error = match http.get(join(&https, "v2/")?).send() {
                Ok(r) => break (https.clone(), r),
                Err(e) => e,
            };
            if plain {
                match http.get(join(&http_url, "v2/")?).send() {
                    // Only a registry's answer to `/v2/` means it speaks plain HTTP; a TLS
                    // server answers plain requests with 400, and its TLS error is the news.
                    Ok(r) if r.status().is_success() || r.status() == StatusCode::UNAUTHORIZED => {
                        break (http_url.clone(), r);
                    }
                    Ok(_) => {
                        return Err(RegistryError::Connection {
                            registry: registry.to_owned(),
                            repository: String::new(),
                            what: "connect over https".into(),
                            message: describe(&tls_error),
                        });
                    }
                    Err(e) if attempt >= settings.retries => {
                        return Err(RegistryError::Connection {
                            registry: registry.to_owned(),
                            repository: String::new(),
                            what: "connect".into(),
                            message: describe(&e),
                        });
                    }
                    Err(_) => {}
                }
            } else if attempt >= settings.retries {
                return Err(RegistryError::Connection {
                    registry: registry.to_owned(),
                    repository: String::new(),
                    what: "connect over https".into(),
                    message: describe(&tls_error),
                });
            }
            std::thread::sleep(settings.backoff_for(attempt));
            attempt += 1;
        };
        let challenge = challenge_of(&response);
        Ok(Client {
            settings: settings.clone(),
            registry: registry.to_owned(),
            base,
            http,
            credentials,
            auth: Mutex::new(AuthState {
                challenge,
                tokens: HashMap::new(),
            }),
        })
    }

    /// True when the registry is reached over plain HTTP.
    pub fn is_plain_http(&self) -> bool {
        self.base.scheme() == "http"
    }

    pub(crate) fn url(&self, path: &str) -> Result<reqwest::Url> {
        join(&self.base, path)
    }

    /// Resolves an upload `Location`, which may be relative.
    pub(crate) fn location(&self, response: &Response) -> Result<reqwest::Url> {
        let value = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| RegistryError::Client("upload response without a Location".into()))?;
        self.base
            .join(value)
            .map_err(|_| RegistryError::Client(format!("invalid upload location {value:?}")))
    }

    /// Checks the credentials this client holds against the registry: `login`.
    pub fn check_login(&self) -> Result<()> {
        let unauthorized = |status: u16| RegistryError::Unauthorized {
            action: "login",
            registry: self.registry.clone(),
            status,
        };
        let challenge = self.lock().challenge.clone();
        match challenge {
            None => Ok(()),
            Some(Challenge::Basic) => {
                let Some(c) = &self.credentials else {
                    return Err(unauthorized(401));
                };
                let response = self
                    .http
                    .get(self.url("v2/")?)
                    .header(AUTHORIZATION, c.basic_header())
                    .send()
                    .map_err(|e| self.connection("", "login", &e))?;
                match response.status() {
                    s if s.is_success() => Ok(()),
                    s => Err(unauthorized(s.as_u16())),
                }
            }
            Some(Challenge::Bearer { realm, service, .. }) => self
                .fetch_token(&realm, service.as_deref(), &[], "login")
                .map(|_| ()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AuthState> {
        self.auth
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn connection(&self, repository: &str, what: &str, e: &reqwest::Error) -> RegistryError {
        RegistryError::Connection {
            registry: self.registry.clone(),
            repository: repository.to_owned(),
            what: what.to_owned(),
            message: describe(e),
        }
    }

    fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
        action: &'static str,
    ) -> Result<HeaderValue> {
        let mut url = reqwest::Url::parse(realm)
            .map_err(|_| RegistryError::Client(format!("invalid token realm {realm:?}")))?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(s) = service {
                query.append_pair("service", s);
            }
            for scope in scopes {
                query.append_pair("scope", scope);
            }
            if let Some(c) = &self.credentials {
                query.append_pair("account", &c.username);
            }
        }
        let mut attempt = 0;
        let response = loop {
            let mut request = self.http.get(url.clone());
            if let Some(c) = &self.credentials {
                request = request.header(AUTHORIZATION, c.basic_header());
            }
            match request.send() {
                Ok(r) if retryable(r.status()) && attempt < self.settings.retries => {}
                Ok(r) => break r,
                Err(_) if attempt < self.settings.retries => {}
                Err(e) => return Err(self.connection("", "token", &e)),
            }
            std::thread::sleep(self.settings.backoff_for(attempt));
            attempt += 1;
        };
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(RegistryError::Unauthorized {
                action,
                registry: self.registry.clone(),
                status: status.as_u16(),
            });
        }
        if !status.is_success() {
            return Err(RegistryError::Http {
                registry: self.registry.clone(),
                repository: String::new(),
                what: "token".into(),
                status: status.as_u16(),
                detail: String::new(),
            });
        }
        let body = response
            .bytes()
            .map_err(|e| self.connection("", "token", &e))?;
        let reply: TokenReply = serde_json::from_slice(&body)
            .map_err(|_| RegistryError::Client("the token reply is not json".into()))?;
        let token = reply
            .token
            .or(reply.access_token)
            .ok_or_else(|| RegistryError::Client("the token reply has no token".into()))?;
        let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| RegistryError::Client("the token is not a valid header value".into()))?;
        value.set_sensitive(true);
        Ok(value)
    }

    /// The `Authorization` header for `scopes`, fetching a token when the registry wants one.
    fn authorization(&self, scopes: &[String], fresh: bool) -> Result<Option<HeaderValue>> {
        let key = scopes.join(" ");
        let challenge = {
            let state = self.lock();
            if !fresh && let Some(v) = state.tokens.get(&key) {
                return Ok(Some(v.clone()));
            }
            state.challenge.clone()
        };
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(self.credentials.as_ref().and_then(|c| {
                let mut v = HeaderValue::from_str(&c.basic_header()).ok()?;
                v.set_sensitive(true);
                Some(v)
            })),
            Some(Challenge::Bearer { realm, service, .. }) => {
                let value = self.fetch_token(&realm, service.as_deref(), scopes, "access")?;
                self.lock().tokens.insert(key, value.clone());
                Ok(Some(value))
            }
        }
    }

    /// Sends the request `build` makes (again for each try) with auth and retries. Returns
    /// the last response, whatever its status, unless every try failed to connect.
    pub(crate) fn send(
        &self,
        target: &Target<'_>,
        build: &dyn Fn(&Http) -> Result<RequestBuilder>,
    ) -> Result<Response> {
        self.send_with(target, build, self.settings.retries)
    }

    /// [`Client::send`] without retries, for requests that are not safe to repeat as they are
    /// (a chunk of an upload session).
    pub(crate) fn send_once(
        &self,
        target: &Target<'_>,
        build: &dyn Fn(&Http) -> Result<RequestBuilder>,
    ) -> Result<Response> {
        self.send_with(target, build, 0)
    }

    fn send_with(
        &self,
        target: &Target<'_>,
        build: &dyn Fn(&Http) -> Result<RequestBuilder>,
        retries: u32,
    ) -> Result<Response> {
        let mut attempt = 0;
        let mut reauthorized = false;
        loop {
            let mut request = build(&self.http)?;
            if let Some(value) = self.authorization(&target.scopes, reauthorized)? {
                request = request.header(AUTHORIZATION, value);
            }
            match request.send() {
                Ok(r) if r.status() == StatusCode::UNAUTHORIZED && !reauthorized => {
                    // A new or changed challenge (first contact, expired token): learn it and
                    // try once more with fresh authorization.
                    if let Some(c) = challenge_of(&r) {
                        self.lock().challenge = Some(c);
                    }
                    reauthorized = true;
                    continue;
                }
                Ok(r) if r.status() == StatusCode::UNAUTHORIZED => {
                    return Err(RegistryError::Unauthorized {
                        action: "access",
                        registry: self.registry.clone(),
                        status: 401,
                    });
                }
                Ok(r) if retryable(r.status()) && attempt < retries => {
                    let wait =
                        retry_after(&r).unwrap_or_else(|| self.settings.backoff_for(attempt));
                    tracing::debug!(
                        registry = %self.registry,
                        repository = target.repository,
                        what = %target.what,
                        status = r.status().as_u16(),
                        "retrying"
                    );
                    std::thread::sleep(wait);
                }
                Ok(r) => return Ok(r),
                Err(e) if attempt < retries => {
                    tracing::debug!(registry = %self.registry, what = %target.what, error = %describe(&e), "retrying");
                    std::thread::sleep(self.settings.backoff_for(attempt));
                }
                Err(e) => return Err(self.connection(target.repository, &target.what, &e)),
            }
            attempt += 1;
        }
    }

    /// The error for an unexpected response.
    pub(crate) fn http_error(&self, target: &Target<'_>, response: Response) -> RegistryError {
        let status = response.status().as_u16();
        if status == 401 || status == 403 {
            return RegistryError::Unauthorized {
                action: "access",
                registry: self.registry.clone(),
                status,
            };
        }
        RegistryError::Http {
            registry: self.registry.clone(),
            repository: target.repository.to_owned(),
            what: target.what.clone(),
            status,
            detail: error_detail(response),
        }
    }
}

fn join(base: &reqwest::Url, path: &str) -> Result<reqwest::Url> {
    base.join(path)
        .map_err(|_| RegistryError::Client(format!("invalid path {path:?}")))
}

fn challenge_of(response: &Response) -> Option<Challenge> {
    if response.status() != StatusCode::UNAUTHORIZED {
        return None;
    }
    response
        .headers()
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(parse_challenge)
        .max_by_key(|c| matches!(c, Challenge::Bearer { .. }))
}

fn retry_after(response: &Response) -> Option<Duration> {
    let seconds: u64 = response
        .headers()
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds.min(10)))
}
