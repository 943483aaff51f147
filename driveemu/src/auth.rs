//! OAuth 2.0 as Google runs it: the token endpoint (JWT-bearer grant for service accounts,
//! RFC 7523; refresh-token grant for installed-app clients) and bearer-token checks.

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

pub(crate) struct Auth {
    verifying_key: Option<rsa::pkcs1v15::VerifyingKey<sha2::Sha256>>,
    pub private_key_id: String,
    pub client_email: String,
    pub sa_client_id: String,
    pub oauth_client_id: String,
    pub oauth_client_secret: String,
    tokens: Mutex<HashMap<String, AccessToken>>,
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
            refresh: Mutex::new(HashMap::new()),
            rng: Mutex::new(rng),
        }
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
    /// `basic` holds client credentials from an HTTP Basic header, if any.
    pub fn token(
        &self,
        params: &HashMap<String, String>,
        basic: Option<(String, String)>,
        token_uri: &str,
        faults: &Faults,
        lifetime: Duration,
    ) -> Result<Value, OAuthError> {
        let grant = params.get("grant_type").map(String::as_str).unwrap_or("");
        match grant {
            JWT_GRANT => {
                let assertion = params
                    .get("assertion")
                    .ok_or_else(|| OAuthError::new(400, "invalid_request", "Missing required parameter: assertion"))?;
                let scopes = self.verify_jwt(assertion, token_uri)?;
                let tok = self.issue_access_token(faults, lifetime, scopes, true);
                // Google's service-account answer carries no scope and no refresh token.
                Ok(json!({ "access_token": tok, "expires_in": lifetime.as_secs(), "token_type": "Bearer" }))
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
                Ok(
                    json!({ "access_token": tok, "expires_in": lifetime.as_secs(), "scope": DRIVE_SCOPE, "token_type": "Bearer" }),
                )
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
