//! OAuth 2.0 as Google runs it: the authorization endpoint of the installed-app flow (a
//! user who always consents, redirected to a loopback URI with a code; PKCE honoured), the
//! token endpoint (authorization-code grant, RFC 6749 4.1 + RFC 7636; JWT-bearer grant for
//! service accounts, RFC 7523; refresh-token grant) and bearer-token checks.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine as _;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rsa::pkcs8::DecodePrivateKey;
use rsa::signature::Verifier;
use serde_json::{json, Value};

use crate::error::{ApiError, OAuthError};
use crate::faults::Faults;
use crate::util::opaque;

pub(crate) const JWT_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// The audience Google's own token endpoint accepts; clients that hard-code it work too.
pub(crate) const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
pub(crate) const DRIVE_SCOPE: &str = "https://www.googleapis.com/auth/drive";

struct AccessToken {
    service_account: bool,
    epoch: u64,
    expires: Instant,
    scopes: Vec<String>,
}

/// An authorization code handed out by the authorization endpoint.
struct CodeGrant {
    client_id: String,
    redirect_uri: String,
    scopes: Vec<String>,
    /// (method, challenge) when the request used PKCE.
    challenge: Option<(String, String)>,
    expires: Instant,
}

/// How long an authorization code may be exchanged (Google: minutes; one use only).
const CODE_LIFETIME: Duration = Duration::from_secs(600);

/// Whether `uri` is a loopback redirect URI, which Google accepts for desktop clients on any
/// port (`http://127.0.0.1:PORT`, `http://[::1]:PORT`, and, discouraged, `http://localhost:PORT`).
fn loopback(uri: &str) -> bool {
    let Some(rest) = uri.strip_prefix("http://") else { return false };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = match host.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()) => h,
        Some((_, _)) if host.starts_with('[') && host.ends_with(']') => host,
        Some(_) => return false,
        None => host,
    };
    matches!(host, "127.0.0.1" | "[::1]" | "localhost")
}

pub(crate) struct Auth {
    verifying_key: Option<rsa::pkcs1v15::VerifyingKey<sha2::Sha256>>,
    pub private_key_id: String,
    pub client_email: String,
    pub sa_client_id: String,
    pub oauth_client_id: String,
    pub oauth_client_secret: String,
    tokens: Mutex<HashMap<String, AccessToken>>,
    codes: Mutex<HashMap<String, CodeGrant>>,
    /// refresh token -> the revocation epoch it was issued in.
    refresh: Mutex<HashMap<String, u64>>,
    rng: Mutex<StdRng>,
}

fn b64url(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).ok()
}

impl Auth {
    pub fn new(mut rng: StdRng) -> Auth {
        // The key is a constant, so failing to parse it is a build defect, not bad input;
        // still, answer every JWT with invalid_grant rather than panic.
        let verifying_key = rsa::RsaPrivateKey::from_pkcs8_pem(crate::keys::SERVICE_ACCOUNT_KEY_PEM)
            .ok()
            .map(|k| rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(k.to_public_key()));
        let hexchars = |rng: &mut StdRng, n: usize| -> String {
            use rand::Rng;
            (0..n).map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0')).collect()
        };
        let digits = |rng: &mut StdRng, n: usize| -> String {
            use rand::Rng;
            (0..n).map(|_| char::from_digit(rng.random_range(0..10), 10).unwrap_or('0')).collect()
        };
        let private_key_id = hexchars(&mut rng, 40);
        let sa_client_id = format!("1{}", digits(&mut rng, 20));
        let oauth_client_id = format!(
            "{}-{}.apps.googleusercontent.com",
            digits(&mut rng, 12),
            opaque(&mut rng, 32).to_lowercase().replace(['-', '_'], "a")
        );
        let oauth_client_secret = format!("GOCSPX-{}", opaque(&mut rng, 28));
        Auth {
            verifying_key,
            private_key_id,
            client_email: "driveemu@driveemu-test.iam.gserviceaccount.com".into(),
            sa_client_id,
            oauth_client_id,
            oauth_client_secret,
            tokens: Mutex::new(HashMap::new()),
            codes: Mutex::new(HashMap::new()),
            refresh: Mutex::new(HashMap::new()),
            rng: Mutex::new(rng),
        }
    }

    /// The authorization endpoint (GET, query `params`): the user signs in and consents at
    /// once. Answers the redirect `Location` (the loopback URI with `code`, `scope` and
    /// `state`), or an error page (status, text) for requests Google refuses without a
    /// redirect: an unknown client, a missing parameter, a non-loopback redirect URI.
    pub fn authorize(&self, params: &HashMap<String, String>, faults: &Faults) -> Result<String, (u16, String)> {
        let get = |k: &str| params.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let Some(client_id) = get("client_id") else {
            return Err((400, "Error 400: invalid_request\nRequired parameter is missing: client_id".into()));
        };
        if client_id != self.oauth_client_id {
            return Err((401, "Error 401: invalid_client\nThe OAuth client was not found.".into()));
        }
        let Some(redirect_uri) = get("redirect_uri") else {
            return Err((400, "Error 400: invalid_request\nRequired parameter is missing: redirect_uri".into()));
        };
        if !loopback(redirect_uri) {
            return Err((400, format!("Error 400: redirect_uri_mismatch\nredirect_uri={redirect_uri}: a desktop client may only redirect to a loopback address")));
        }
        let sep = if redirect_uri.contains('?') { '&' } else { '?' };
        let state = get("state").map(|s| format!("&state={}", enc(s))).unwrap_or_default();
        let redirect_err =
            |e: &str, d: &str| Ok(format!("{redirect_uri}{sep}error={e}&error_description={}{state}", enc(d)));
        if get("response_type") != Some("code") {
            return redirect_err("unsupported_response_type", "response_type must be code");
        }
        let scopes: Vec<String> = get("scope").unwrap_or("").split_whitespace().map(str::to_string).collect();
        if scopes.is_empty() {
            return Err((400, "Error 400: invalid_request\nMissing required parameter: scope".into()));
        }
        if faults.consent_denied() {
            return redirect_err("access_denied", "The user denied access");
        }
        let challenge = match (get("code_challenge"), get("code_challenge_method").unwrap_or("plain")) {
            (None, _) => None,
            (Some(c), m @ ("plain" | "S256")) => Some((m.to_string(), c.to_string())),
            (Some(_), _) => return redirect_err("invalid_request", "Invalid code_challenge_method"),
        };
        let code = format!("4/0{}", opaque(&mut self.rng.lock(), 70));
        self.codes.lock().insert(
            code.clone(),
            CodeGrant {
                client_id: client_id.to_string(),
                redirect_uri: redirect_uri.to_string(),
                scopes: scopes.clone(),
                challenge,
                expires: Instant::now() + CODE_LIFETIME,
            },
        );
        Ok(format!("{redirect_uri}{sep}code={}&scope={}{state}", enc(&code), enc(&scopes.join(" "))))
    }

    /// The authorization-code grant: one use per code, same client and redirect URI as the
    /// authorization request, and the PKCE verifier when a challenge was sent.
    fn exchange_code(
        &self,
        params: &HashMap<String, String>,
        client: (String, String),
        faults: &Faults,
        lifetime: Duration,
    ) -> Result<(Value, Option<String>), OAuthError> {
        let (cid, secret) = client;
        if cid != self.oauth_client_id {
            return Err(OAuthError::new(401, "invalid_client", "The OAuth client was not found."));
        }
        if secret != self.oauth_client_secret {
            return Err(OAuthError::new(401, "invalid_client", "Unauthorized"));
        }
        let code = params
            .get("code")
            .ok_or_else(|| OAuthError::new(400, "invalid_request", "Missing required parameter: code"))?;
        // Removed whatever follows: a code is good for one exchange only.
        let grant = self.codes.lock().remove(code).ok_or_else(|| OAuthError::invalid_grant("Malformed auth code."))?;
        if Instant::now() >= grant.expires || grant.client_id != cid {
            return Err(OAuthError::invalid_grant("Bad Request"));
        }
        if params.get("redirect_uri") != Some(&grant.redirect_uri) {
            return Err(OAuthError::new(400, "redirect_uri_mismatch", "Bad Request"));
        }
        match (&grant.challenge, params.get("code_verifier")) {
            (None, None) => {}
            (None, Some(_)) => return Err(OAuthError::invalid_grant("code_verifier or verifier is not needed.")),
            (Some(_), None) => return Err(OAuthError::invalid_grant("Missing code verifier.")),
            (Some((method, challenge)), Some(v)) => {
                let derived = if method == "S256" {
                    use sha2::Digest;
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(v.as_bytes()))
                } else {
                    v.clone()
                };
                if &derived != challenge {
                    return Err(OAuthError::invalid_grant("Invalid code verifier."));
                }
            }
        }
        let refresh = self.issue_refresh_token(faults);
        let tok = self.issue_access_token(faults, lifetime, grant.scopes.clone(), false);
        let answer = json!({
            "access_token": tok, "expires_in": lifetime.as_secs(), "refresh_token": refresh,
            "scope": grant.scopes.join(" "), "token_type": "Bearer",
        });
        Ok((answer, grant.challenge.map(|(method, _)| method)))
    }

    pub fn issue_refresh_token(&self, faults: &Faults) -> String {
        let t = format!("1//0{}", opaque(&mut self.rng.lock(), 60));
        self.refresh.lock().insert(t.clone(), faults.refresh_epoch.load(Ordering::SeqCst));
        t
    }

    fn issue_access_token(
        &self,
        faults: &Faults,
        lifetime: Duration,
        scopes: Vec<String>,
        service_account: bool,
    ) -> String {
        let t = format!("ya29.{}", opaque(&mut self.rng.lock(), 100));
        self.tokens.lock().insert(
            t.clone(),
            AccessToken {
                service_account,
                epoch: faults.token_epoch.load(Ordering::SeqCst),
                expires: Instant::now() + lifetime,
                scopes,
            },
        );
        t
    }

    /// Handles a token-endpoint POST whose body is already decoded into `params`.
    /// `basic` holds client credentials from an HTTP Basic header, if any. Answers the
    /// JSON, and the PKCE method whose `code_verifier` was checked (a code grant that
    /// sent a challenge), so tests can see that a client proved it holds the verifier.
    pub fn token(
        &self,
        params: &HashMap<String, String>,
        basic: Option<(String, String)>,
        token_uri: &str,
        faults: &Faults,
        lifetime: Duration,
    ) -> Result<(Value, Option<String>), OAuthError> {
        let grant = params.get("grant_type").map(String::as_str).unwrap_or("");
        match grant {
            JWT_GRANT => {
                let assertion = params
                    .get("assertion")
                    .ok_or_else(|| OAuthError::new(400, "invalid_request", "Missing required parameter: assertion"))?;
                let scopes = self.verify_jwt(assertion, token_uri)?;
                let tok = self.issue_access_token(faults, lifetime, scopes, true);
                // Google's service-account answer carries no scope and no refresh token.
                Ok((json!({ "access_token": tok, "expires_in": lifetime.as_secs(), "token_type": "Bearer" }), None))
            }
            "authorization_code" => {
                let client = match basic {
                    Some(b) => b,
                    None => (
                        params.get("client_id").cloned().unwrap_or_default(),
                        params.get("client_secret").cloned().unwrap_or_default(),
                    ),
                };
                self.exchange_code(params, client, faults, lifetime)
            }
            "refresh_token" => {
                let (cid, secret) = match basic {
                    Some(b) => b,
                    None => (
                        params.get("client_id").cloned().unwrap_or_default(),
                        params.get("client_secret").cloned().unwrap_or_default(),
                    ),
                };
                if cid != self.oauth_client_id {
                    return Err(OAuthError::new(401, "invalid_client", "The OAuth client was not found."));
                }
                if secret != self.oauth_client_secret {
                    return Err(OAuthError::new(401, "invalid_client", "Unauthorized"));
                }
                let rt = params.get("refresh_token").ok_or_else(|| {
                    OAuthError::new(400, "invalid_request", "Missing required parameter: refresh_token")
                })?;
                let epoch_now = faults.refresh_epoch.load(Ordering::SeqCst);
                match self.refresh.lock().get(rt) {
                    Some(e) if *e == epoch_now => {}
                    _ => return Err(OAuthError::invalid_grant("Token has been expired or revoked.")),
                }
                let tok = self.issue_access_token(faults, lifetime, vec![DRIVE_SCOPE.to_string()], false);
                Ok((
                    json!({ "access_token": tok, "expires_in": lifetime.as_secs(), "scope": DRIVE_SCOPE, "token_type": "Bearer" }),
                    None,
                ))
            }
            "" => Err(OAuthError::new(400, "invalid_request", "Missing required parameter: grant_type")),
            other => Err(OAuthError::new(400, "unsupported_grant_type", format!("Invalid grant_type: {other}"))),
        }
    }

    /// Verifies an RS256 JWT assertion (signature, iss, aud, iat/exp, scope) and returns its scopes.
    fn verify_jwt(&self, jwt: &str, token_uri: &str) -> Result<Vec<String>, OAuthError> {
        let parts: Vec<&str> = jwt.split('.').collect();
        if parts.len() != 3 {
            return Err(OAuthError::invalid_grant("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim."));
        }
        let bad_sig = || OAuthError::invalid_grant("Invalid JWT Signature.");
        let header: Value = b64url(parts[0]).and_then(|b| serde_json::from_slice(&b).ok()).ok_or_else(bad_sig)?;
        let claims: Value = b64url(parts[1]).and_then(|b| serde_json::from_slice(&b).ok()).ok_or_else(bad_sig)?;
        if header.get("alg").and_then(Value::as_str) != Some("RS256") {
            return Err(bad_sig());
        }
        // Google looks the signing key up by the issuer; one service account exists here.
        if claims.get("iss").and_then(Value::as_str) != Some(self.client_email.as_str()) {
            return Err(OAuthError::invalid_grant("Invalid grant: account not found"));
        }
        let sig = b64url(parts[2]).ok_or_else(bad_sig)?;
        let sig = rsa::pkcs1v15::Signature::try_from(sig.as_slice()).map_err(|_| bad_sig())?;
        let vk = self.verifying_key.as_ref().ok_or_else(bad_sig)?;
        let signing_input = format!("{}.{}", parts[0], parts[1]);
        vk.verify(signing_input.as_bytes(), &sig).map_err(|_| bad_sig())?;
        let aud = claims.get("aud").and_then(Value::as_str).unwrap_or("");
        if aud != token_uri && aud != GOOGLE_TOKEN_URI {
            return Err(OAuthError::invalid_grant("Invalid JWT: Failed audience check."));
        }
        let now = crate::util::now_ms() / 1000;
        let iat = claims.get("iat").and_then(Value::as_i64);
        let exp = claims.get("exp").and_then(Value::as_i64);
        let timeframe = || {
            OAuthError::invalid_grant("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.")
        };
        let (Some(iat), Some(exp)) = (iat, exp) else { return Err(timeframe()) };
        // A little clock skew is tolerated, as Google does.
        if exp <= now || iat > now + 300 || exp - iat > 3600 || exp < iat {
            return Err(timeframe());
        }
        let scopes: Vec<String> =
            claims.get("scope").and_then(Value::as_str).unwrap_or("").split_whitespace().map(str::to_string).collect();
        if scopes.is_empty() {
            return Err(OAuthError::new(400, "invalid_scope", "Invalid OAuth scope or ID token audience provided."));
        }
        Ok(scopes)
    }

    /// Checks an `Authorization` header value for an API call; Ok(true) = a service account.
    pub fn check_bearer(&self, header: Option<&str>, faults: &Faults) -> Result<bool, ApiError> {
        let Some(h) = header else { return Err(ApiError::login_required()) };
        let Some(tok) = h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")) else {
            return Err(ApiError::auth_error());
        };
        let tokens = self.tokens.lock();
        let Some(t) = tokens.get(tok.trim()) else { return Err(ApiError::auth_error()) };
        if t.epoch != faults.token_epoch.load(Ordering::SeqCst) || Instant::now() >= t.expires {
            return Err(ApiError::auth_error());
        }
        if !t.scopes.iter().any(|s| s.starts_with(DRIVE_SCOPE)) {
            return Err(ApiError::insufficient_scopes());
        }
        Ok(t.service_account)
    }
}

/// Percent-encodes a query value.
fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
