//! files.list: the q grammar, pagination, ordering, and listings that lag behind creates.

use std::collections::HashSet;
use std::time::Duration;

use driveemu::Config;
use serde_json::{json, Value};

use crate::common::*;

fn names(v: &Value) -> Vec<String> {
    v["files"]
        .as_array()
        .map(|a| a.iter().map(|f| f["name"].as_str().unwrap_or("").to_string()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn q_terms_escapes_and_boolean_logic() {
    let api = Api::new().await;
    let dir = api.folder("vol", "root").await;
    let odd = r"it's a \ name";
    api.create(json!({"name": odd, "parents": [dir]})).await;
    api.create(json!({"name": "m1", "parents": [dir], "appProperties": {"kind": "manifest", "gen": "1"}})).await;
    api.create(json!({"name": "m2", "parents": [dir], "appProperties": {"kind": "manifest", "gen": "2"}})).await;
    api.create(
        json!({"name": "p1", "parents": [dir], "mimeType": "application/x-pack", "appProperties": {"kind": "pack"}}),
    )
    .await;
    let gone = api.create(json!({"name": "old", "parents": [dir]})).await;
    api.create(json!({"name": "elsewhere"})).await;
    api.json(
        reqwest::Method::PATCH,
        &format!("/drive/v3/files/{}", gone["id"].as_str().expect("id")),
        json!({"trashed": true}),
    )
    .await;

    let q = |s: &str| format!("q={}&fields=files(name)&orderBy=name", enc(s));
    let in_dir = format!("'{dir}' in parents");
    // Escapes: \' and \\ inside single quotes.
    let v = api.list(&q(&format!(r"{in_dir} and name = 'it\'s a \\ name'"))).await;
    assert_eq!(v.code(), 200, "{}", String::from_utf8_lossy(&v.body));
    assert_eq!(names(&v.json()), [odd]);
    let v = api.list(&q(&format!("{in_dir} and appProperties has {{ key='kind' and value='manifest' }}"))).await.json();
    assert_eq!(names(&v), ["m1", "m2"]);
    let v = api
        .list(&q(&format!("{in_dir} and (name = 'm1' or mimeType = 'application/x-pack') and not name contains 'p'")))
        .await
        .json();
    assert_eq!(names(&v), ["m1"]);
    let v = api
        .list(&q(&format!(
            "{in_dir} and trashed = false and not appProperties has {{ key='kind' and value='manifest' }}"
        )))
        .await
        .json();
    assert_eq!(names(&v), [odd, "p1"]);
    let v = api.list(&q(&format!("{in_dir} and trashed = true"))).await.json();
    assert_eq!(names(&v), ["old"]);
    // No q: everything, trashed included (Drive's default), root alias works in q.
    assert_eq!(names(&api.list(&q("'root' in parents")).await.json()), ["elsewhere", "vol"]);
    let v = api
        .list(&q(&format!("{in_dir} and modifiedTime > '2000-01-01T00:00:00' and mimeType != 'application/x-pack'")))
        .await
        .json();
    assert_eq!(names(&v).len(), 4);
    // Bad queries: 400 invalid on parameter q.
    for bad in [
        "name = 'unterminated",
        "name === 'x'",
        "bogus = 'x'",
        "name = 'a' and",
        r"name = 'bad \n escape'",
        "(name = 'x'",
    ] {
        let r = api.list(&format!("q={}", enc(bad))).await;
        assert_eq!(r.code(), 400, "{bad}");
        assert_eq!(r.reason(), "invalid", "{bad}");
        assert_eq!(r.json()["error"]["errors"][0]["location"], "q");
    }
}

#[tokio::test]
async fn pagination_and_order() {
    let api = Api::new().await;
    let dir = api.folder("many", "root").await;
    let mut want = HashSet::new();
    for i in 0..25 {
        let name = format!("f{:02}", (i * 7) % 25);
        api.create(json!({"name": name, "parents": [dir]})).await;
        want.insert(name);
    }
    let q = enc(&format!("'{dir}' in parents"));
    let mut got = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut url = format!("q={q}&pageSize=10&orderBy=name&fields=nextPageToken,files(id,name)");
        if let Some(t) = &token {
            url.push_str(&format!("&pageToken={}", enc(t)));
        }
        let v = api.list(&url).await.json();
        got.extend(names(&v));
        pages += 1;
        match v["nextPageToken"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(pages, 3);
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(got, sorted, "orderBy=name across pages");
    assert_eq!(got.iter().cloned().collect::<HashSet<_>>(), want);
    // createdTime desc: the reverse of creation order.
    let v = api.list(&format!("q={q}&pageSize=3&orderBy=createdTime desc")).await.json();
    assert_eq!(names(&v), ["f18", "f11", "f04"]);
    assert!(v["nextPageToken"].is_string());
    // As documented: `name` sorts alphabetically (1, 12, 2, 22),
    // `name_natural` by numbers (1, 2, 12, 22); `desc` reverses either.
    let nums = api.folder("nums", "root").await;
    for n in ["12", "2", "22", "1"] {
        api.create(json!({"name": n, "parents": [nums]})).await;
    }
    let nq = enc(&format!("'{nums}' in parents"));
    let by = |o: &str| format!("q={nq}&orderBy={}&fields=files(name)", enc(o));
    assert_eq!(names(&api.list(&by("name")).await.json()), ["1", "12", "2", "22"]);
    assert_eq!(names(&api.list(&by("name_natural")).await.json()), ["1", "2", "12", "22"]);
    assert_eq!(names(&api.list(&by("name desc")).await.json()), ["22", "2", "12", "1"]);
    assert_eq!(names(&api.list(&by("name_natural desc")).await.json()), ["22", "12", "2", "1"]);
    // Default fields of a list: kind, incompleteSearch, nextPageToken, files(kind,id,name,mimeType).
    let f0 = &v["files"][0];
    assert_eq!(f0.as_object().map(|o| o.len()), Some(4), "{f0}");
    assert_eq!(v["kind"], "drive#fileList");
    // Bad parameters.
    assert_eq!(api.list("pageSize=1001").await.code(), 400);
    assert_eq!(api.list("pageSize=0").await.code(), 400);
    assert_eq!(api.list("pageToken=garbage").await.code(), 400);
    assert_eq!(api.list("orderBy=size").await.code(), 400);
    assert_eq!(api.list("fields=files(id,bogus)").await.code(), 400);
}

#[tokio::test]
async fn listing_lags_behind_creates_but_get_does_not() {
    let api = Api::with(Config { listing_lag: Duration::from_millis(600), ..Config::default() }).await;
    let f = api.create(json!({"name": "fresh"})).await;
    let id = f["id"].as_str().expect("id");
    let q = format!("q={}", enc("name = 'fresh'"));
    assert_eq!(names(&api.list(&q).await.json()).len(), 0, "not listed yet");
    assert_eq!(api.get(&format!("/drive/v3/files/{id}")).await.code(), 200, "get by id sees it at once");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(names(&api.list(&q).await.json()), ["fresh"]);
    // The lag can be changed while running.
    api.emu.faults().set_listing_lag(Duration::ZERO);
    api.create(json!({"name": "fresh"})).await;
    assert_eq!(names(&api.list(&q).await.json()).len(), 2);
}

#[tokio::test]
async fn short_and_empty_pages_before_the_end() {
    let api = Api::new().await;
    for i in 0..30 {
        api.create(json!({"name": format!("n{i:02}")})).await;
    }
    api.emu.faults().set_short_pages(true);
    let mut got = Vec::new();
    let mut sizes = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..500 {
        let mut url = "pageSize=8&orderBy=name&fields=nextPageToken,files(name)".to_string();
        if let Some(t) = &token {
            url.push_str(&format!("&pageToken={}", enc(t)));
        }
        let v = api.list(&url).await.json();
        let n = names(&v);
        sizes.push(n.len());
        got.extend(n);
        match v["nextPageToken"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => break,
        }
    }
    assert_eq!(got, (0..30).map(|i| format!("n{i:02}")).collect::<Vec<_>>());
    assert!(sizes.iter().any(|n| *n < 8), "some page should be short: {sizes:?}");
}

/// files.list `spaces`: "A comma-separated list of spaces to query within the corpora.
/// Supported values are 'drive' and 'appDataFolder'" (files.list reference). The emulator
/// keeps nothing in appDataFolder, so a listing of that space alone finds nothing.
#[tokio::test]
async fn spaces_select_what_is_listed() {
    let api = Api::new().await;
    api.create(json!({"name": "in-my-drive"})).await;
    let files = |r: Resp| r.json()["files"].as_array().map(Vec::len);
    assert_eq!(files(api.list("fields=files(name)").await), Some(1));
    assert_eq!(files(api.list("spaces=drive&fields=files(name)").await), Some(1));
    assert_eq!(files(api.list("spaces=drive,appDataFolder&fields=files(name)").await), Some(1));
    assert_eq!(files(api.list("spaces=appDataFolder&fields=files(name)").await), Some(0));
    let r = api.list("spaces=photos").await;
    assert_eq!((r.code(), r.reason().as_str()), (400, "invalid"));
}

/// Google's client libraries send a GET whose URL would pass 2,048
/// characters as a POST with `X-HTTP-Method-Override: GET` and the query's
/// parameters form-encoded in the body.
#[tokio::test]
async fn a_long_listing_goes_as_a_post_with_a_method_override() {
    let api = Api::new().await;
    let dir = api.folder("vol", "root").await;
    api.create(json!({"name": "wanted", "parents": [dir]})).await;
    api.create(json!({"name": "other", "parents": [dir]})).await;
    // Many terms, as a client listing many folders at once writes them.
    let mut q = format!("'{dir}' in parents and (name = 'wanted'");
    for i in 0..150 {
        q.push_str(&format!(" or name = 'absent-{i}'"));
    }
    q.push(')');
    let form = format!("q={}&fields=files(name)", enc(&q));
    assert!(form.len() > 2048);
    let r = api
        .send(
            reqwest::Method::POST,
            "/drive/v3/files",
            &[("X-HTTP-Method-Override", "GET"), ("Content-Type", "application/x-www-form-urlencoded")],
            form.into_bytes(),
        )
        .await;
    assert_eq!(r.code(), 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(names(&r.json()), ["wanted"]);
}

/// Drive's `name =` ignores case (rclone checks the names it gets back
/// "since the `=` operator is case insensitive").
#[tokio::test]
async fn name_equality_ignores_case() {
    let api = Api::new().await;
    let dir = api.folder("vol", "root").await;
    api.create(json!({"name": "VMs", "parents": [dir]})).await;
    api.create(json!({"name": "notes", "parents": [dir], "mimeType": "text/plain"})).await;
    let q = |s: &str| format!("q={}&fields=files(name)", enc(&format!("'{dir}' in parents and {s}")));
    assert_eq!(names(&api.list(&q("name = 'vms'")).await.json()), ["VMs"]);
    assert_eq!(names(&api.list(&q("name != 'VMS'")).await.json()), ["notes"]);
}
