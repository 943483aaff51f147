//! OAuth token endpoint (JWT-bearer and refresh-token grants) and bearer checks on the API.

use std::time::Duration;

use base64::Engine as _;
use driveemu::{Config, Emulator};
use reqwest::Method;
use rsa::pkcs8::DecodePrivateKey;
use rsa::signature::{SignatureEncoding, Signer};
use serde_json::{json, Value};

use crate::common::*;

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64
}

/// Signs a JWT with the key from the emulator's service-account JSON, as a client would.
fn sign(key_json: &str, claims: &Value) -> String {
    let key: Value = serde_json::from_str(key_json).expect("key json");
    let pem = key["private_key"].as_str().expect("private_key");
    let sk = rsa::RsaPrivateKey::from_pkcs8_pem(pem).expect("pkcs8 key");
    let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(sk);
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": key["private_key_id"]});
    let input =
        format!("{}.{}", b64(&serde_json::to_vec(&header).expect("h")), b64(&serde_json::to_vec(claims).expect("c")));
    let sig = signer.sign(input.as_bytes()).to_bytes();
    format!("{input}.{}", b64(&sig))
}

fn claims(emu: &Emulator) -> Value {
    let key: Value = serde_json::from_str(&emu.service_account_key_json()).expect("key json");
    json!({
        "iss": key["client_email"], "aud": key["token_uri"],
        "scope": "https://www.googleapis.com/auth/drive",
        "iat": now(), "exp": now() + 3600,
    })
}

async fn jwt_grant(http: &reqwest::Client, emu: &Emulator, jwt: &str) -> (u16, Value) {
    let r = http
        .post(emu.token_uri())
        .form(&[("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"), ("assertion", jwt)])
        .send()
        .await
        .expect("token post");
    let s = r.status().as_u16();
    (s, serde_json::from_slice(&r.bytes().await.expect("body")).unwrap_or(Value::Null))
}

#[tokio::test]
async fn service_account_jwt_grant_then_api_call() {
    let emu = Emulator::start(Config::default()).await.expect("start");
    let key: Value = serde_json::from_str(&emu.service_account_key_json()).expect("key json");
    assert_eq!(key["type"], "service_account");
    assert_eq!(key["token_uri"], emu.token_uri());
    assert!(key["private_key"].as_str().expect("pem").starts_with("-----BEGIN PRIVATE KEY-----"));
    let http = http();
    let (s, v) = jwt_grant(&http, &emu, &sign(&emu.service_account_key_json(), &claims(&emu))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 3600);
    let tok = v["access_token"].as_str().expect("token");
    let r = http.get(format!("{}/drive/v3/files", emu.base_url())).bearer_auth(tok).send().await.expect("list");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn jwt_failures_answer_invalid_grant() {
    let emu = Emulator::start(Config::default()).await.expect("start");
    let http = http();
    let key = emu.service_account_key_json();
    // A tampered signature.
    let good = sign(&key, &claims(&emu));
    let (head, sig) = good.rsplit_once('.').expect("jwt");
    let mut sig: Vec<u8> = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig).expect("b64");
    sig[10] ^= 1;
    let (s, v) = jwt_grant(&http, &emu, &format!("{head}.{}", b64(&sig))).await;
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_grant")), "{v}");
    assert_eq!(v["error_description"], "Invalid JWT Signature.");
    // Claims changed after signing: the signature no longer matches.
    let mut c = claims(&emu);
    c["scope"] = json!("https://www.googleapis.com/auth/drive.readonly");
    let forged = format!(
        "{}.{}.{}",
        good.split('.').next().expect("h"),
        b64(&serde_json::to_vec(&c).expect("c")),
        good.rsplit('.').next().expect("s")
    );
    assert_eq!(jwt_grant(&http, &emu, &forged).await.0, 400);
    // Wrong audience, expired, too long-lived, unknown issuer, no scope.
    for (k, val) in [
        ("aud", json!("https://example.invalid/token")),
        ("exp", json!(now() - 10)),
        ("exp", json!(now() + 7200)),
        ("iss", json!("someone@else.iam.gserviceaccount.com")),
    ] {
        let mut c = claims(&emu);
        c[k] = val.clone();
        let (s, v) = jwt_grant(&http, &emu, &sign(&key, &c)).await;
        assert_eq!((s, v["error"].as_str()), (400, Some("invalid_grant")), "{k}={val}: {v}");
    }
    let mut c = claims(&emu);
    c.as_object_mut().expect("obj").remove("scope");
    let (s, v) = jwt_grant(&http, &emu, &sign(&key, &c)).await;
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_scope")), "{v}");
    // Garbage and an unknown grant type.
    assert_eq!(jwt_grant(&http, &emu, "not.a.jwt").await.0, 400);
    let r = http.post(emu.token_uri()).form(&[("grant_type", "password")]).send().await.expect("post");
    assert_eq!(r.status(), 400);
    let v: Value = serde_json::from_slice(&r.bytes().await.expect("b")).expect("json");
    assert_eq!(v["error"], "unsupported_grant_type");
}

#[tokio::test]
async fn refresh_grant_client_checks_and_revocation() {
    let emu = Emulator::start(Config::default()).await.expect("start");
    let http = http();
    let (id, secret) = emu.oauth_client();
    let rt = emu.issue_refresh_token();
    let post = |form: Vec<(&'static str, String)>| {
        let http = http.clone();
        let uri = emu.token_uri();
        async move {
            let r = http.post(uri).form(&form).send().await.expect("post");
            let s = r.status().as_u16();
            (s, serde_json::from_slice::<Value>(&r.bytes().await.expect("b")).unwrap_or(Value::Null))
        }
    };
    let ok = vec![
        ("grant_type", "refresh_token".to_string()),
        ("client_id", id.clone()),
        ("client_secret", secret.clone()),
        ("refresh_token", rt.clone()),
    ];
    let (s, v) = post(ok.clone()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["token_type"], "Bearer");
    assert!(v["scope"].as_str().expect("scope").contains("auth/drive"));
    // Client credentials in an HTTP Basic header work as well (RFC 6749 2.3.1).
    let r = http
        .post(emu.token_uri())
        .basic_auth(&id, Some(&secret))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", rt.as_str())])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    let (s, v) = post(vec![
        ("grant_type", "refresh_token".into()),
        ("client_id", id.clone()),
        ("client_secret", "wrong".into()),
        ("refresh_token", rt.clone()),
    ])
    .await;
    assert_eq!((s, v["error"].as_str()), (401, Some("invalid_client")));
    let (s, v) = post(vec![
        ("grant_type", "refresh_token".into()),
        ("client_id", id.clone()),
        ("client_secret", secret.clone()),
        ("refresh_token", "1//0bogus".into()),
    ])
    .await;
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_grant")));
    emu.faults().revoke_refresh_tokens();
    let (s, v) = post(ok).await;
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_grant")), "{v}");
    assert_eq!(v["error_description"], "Token has been expired or revoked.");
    // A token issued after the revocation works.
    let fresh = emu.issue_refresh_token();
    let (s, _) = post(vec![
        ("grant_type", "refresh_token".into()),
        ("client_id", id),
        ("client_secret", secret),
        ("refresh_token", fresh),
    ])
    .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn api_answers_401_until_the_client_refreshes() {
    let api = Api::new().await;
    assert_eq!(api.get("/drive/v3/files").await.code(), 200);
    // No credentials at all.
    let r = api.http.get(api.url("/drive/v3/files")).send().await.expect("get");
    assert_eq!(r.status(), 401);
    let v: Value = serde_json::from_slice(&r.bytes().await.expect("b")).expect("json");
    assert_eq!(v["error"]["code"], 401);
    assert_eq!(v["error"]["errors"][0]["reason"], "required");
    // An unknown token.
    let r = api.http.get(api.url("/drive/v3/files")).bearer_auth("ya29.nope").send().await.expect("get");
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("www-authenticate").is_some());
    // Every token expires at once.
    api.emu.faults().expire_tokens_now();
    let r = api.get("/drive/v3/files").await;
    assert_eq!(r.code(), 401);
    assert_eq!(r.reason(), "authError");
    assert_eq!(r.json()["error"]["message"], "Invalid Credentials");
    let fresh = user_token(&api.http, &api.emu).await;
    let r = api.http.get(api.url("/drive/v3/files")).bearer_auth(&fresh).send().await.expect("get");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn tokens_expire_after_their_lifetime() {
    let api = Api::with(Config { token_lifetime: Duration::from_millis(1200), ..Config::default() }).await;
    let r = api.http.post(api.emu.token_uri()).form(&[("grant_type", "refresh_token")]).send().await.expect("post");
    assert_eq!(r.status(), 401, "no client id: invalid_client");
    assert_eq!(api.get("/drive/v3/files").await.code(), 200);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(api.get("/drive/v3/files").await.code(), 401);
    // A metadata write fails the same way (nothing is written).
    let r = api.json(Method::POST, "/drive/v3/files", json!({"name": "x"})).await;
    assert_eq!(r.code(), 401);
}

#[tokio::test]
async fn service_account_token_without_drive_scope_is_refused() {
    let emu = Emulator::start(Config::default()).await.expect("start");
    let http = http();
    let mut c = claims(&emu);
    c["scope"] = json!("https://www.googleapis.com/auth/cloud-platform");
    let (s, v) = jwt_grant(&http, &emu, &sign(&emu.service_account_key_json(), &c)).await;
    assert_eq!(s, 200);
    let tok = v["access_token"].as_str().expect("token");
    let r = http.get(format!("{}/drive/v3/files", emu.base_url())).bearer_auth(tok).send().await.expect("get");
    assert_eq!(r.status(), 403);
    let v: Value = serde_json::from_slice(&r.bytes().await.expect("b")).expect("json");
    assert_eq!(v["error"]["errors"][0]["reason"], "insufficientPermissions");
}

/// Follows the authorization endpoint as a browser would, without following the redirect.
async fn authorize(http: &reqwest::Client, emu: &Emulator, query: &[(&str, &str)]) -> (u16, String) {
    let r = http.get(emu.auth_uri()).query(query).send().await.expect("authorize");
    let s = r.status().as_u16();
    let loc = r.headers().get("location").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    (s, loc)
}

fn param(url: &str, k: &str) -> Option<String> {
    let q = url.split_once('?')?.1;
    form_urlencoded::parse(q.as_bytes()).find(|(n, _)| n == k).map(|(_, v)| v.into_owned())
}

/// The installed-app flow: authorization request with PKCE (S256) to a loopback URI, the
/// redirect with a code and the state, the code exchanged once for an access and a refresh
/// token that work; a reused code, a wrong verifier, another redirect URI, a non-loopback
/// redirect and a denied consent all fail the way Google's endpoints do.
#[tokio::test]
async fn installed_app_authorization_code_flow() {
    use sha2::Digest;
    let emu = Emulator::start(Config::default()).await.expect("start");
    let http =
        reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().expect("client");
    let (cid, secret) = emu.oauth_client();
    let verifier = "a-verifier-of-at-least-forty-three-characters-0123456789";
    let challenge = b64(&sha2::Sha256::digest(verifier.as_bytes()));
    let redirect = "http://127.0.0.1:55555";
    let q = [
        ("client_id", cid.as_str()),
        ("redirect_uri", redirect),
        ("response_type", "code"),
        ("scope", "https://www.googleapis.com/auth/drive"),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
        ("state", "xyz"),
        ("access_type", "offline"),
    ];
    let (s, loc) = authorize(&http, &emu, &q).await;
    assert_eq!(s, 302);
    assert!(loc.starts_with(&format!("{redirect}?")), "{loc}");
    assert_eq!(param(&loc, "state").as_deref(), Some("xyz"));
    let code = param(&loc, "code").expect("code");
    let exchange = |code: String, verifier: &'static str, redirect: &'static str| {
        let (http, uri, cid, secret) = (http.clone(), emu.token_uri(), cid.clone(), secret.clone());
        async move {
            let r = http
                .post(uri)
                .form(&[
                    ("grant_type", "authorization_code"),
                    ("code", code.as_str()),
                    ("client_id", cid.as_str()),
                    ("client_secret", secret.as_str()),
                    ("redirect_uri", redirect),
                    ("code_verifier", verifier),
                ])
                .send()
                .await
                .expect("token");
            let s = r.status().as_u16();
            (s, serde_json::from_slice::<Value>(&r.bytes().await.expect("body")).unwrap_or(Value::Null))
        }
    };
    let (s, v) =
        exchange(code.clone(), "wrong-verifier-wrong-verifier-wrong-verifier-00", "http://127.0.0.1:55555").await;
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_grant")), "{v}");
    // A failed exchange spends the code too; get a fresh one.
    let (_, loc) = authorize(&http, &emu, &q).await;
    let code = param(&loc, "code").expect("code");
    let (s, v) = exchange(code.clone(), verifier, "http://127.0.0.1:1").await;
    assert_eq!((s, v["error"].as_str()), (400, Some("redirect_uri_mismatch")), "{v}");
    let (_, loc) = authorize(&http, &emu, &q).await;
    let code = param(&loc, "code").expect("code");
    let (s, v) = exchange(code.clone(), verifier, "http://127.0.0.1:55555").await;
    assert_eq!(s, 200, "{v}");
    assert!(v["refresh_token"].as_str().is_some_and(|t| !t.is_empty()), "{v}");
    let tok = v["access_token"].as_str().expect("access token").to_string();
    let r = http
        .get(format!("{}/drive/v3/about", emu.base_url()))
        .query(&[("fields", "user")])
        .bearer_auth(&tok)
        .send()
        .await
        .expect("about");
    assert_eq!(r.status().as_u16(), 200);
    let (s, v) = exchange(code, verifier, "http://127.0.0.1:55555").await;
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_grant")), "a code is good once: {v}");
    // Refused without a redirect: a non-loopback redirect URI, an unknown client.
    let mut bad = q;
    bad[1] = ("redirect_uri", "https://example.com/cb");
    assert_eq!(authorize(&http, &emu, &bad).await.0, 400);
    let mut bad = q;
    bad[0] = ("client_id", "nobody.apps.googleusercontent.com");
    assert_eq!(authorize(&http, &emu, &bad).await.0, 401);
    // The user clicks Cancel: redirected with error=access_denied.
    emu.faults().set_consent_denied(true);
    let (s, loc) = authorize(&http, &emu, &q).await;
    assert_eq!((s, param(&loc, "error").as_deref()), (302, Some("access_denied")), "{loc}");
}
