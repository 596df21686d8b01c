//! `customer`: the "YAO Bank" page, byte for byte as the lab shows it, with Name and Balance
//! from the summary service. If summary fails, a 502 that says how (and a line on stderr).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::{CONTENT_TYPE, LOCATION};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::text_field;
use crate::access_log;
use crate::cli::CustomerArgs;
use crate::server;

#[derive(Debug)]
struct Config {
    summary_url: String,
    timeout: Duration,
}

pub async fn run(args: CustomerArgs) -> anyhow::Result<()> {
    let app = router(&args.summary_url, args.timeout);
    server::serve_http("customer", args.listen, app).await
}

pub fn router(summary_url: &str, timeout: Duration) -> Router {
    let config = Arc::new(Config {
        summary_url: summary_url.to_owned(),
        timeout,
    });
    Router::new()
        .route("/", get(page))
        .route("/logout", get(logout))
        .route("/healthz", get(super::healthz))
        .with_state(config)
}

async fn page(State(config): State<Arc<Config>>) -> Response {
    let summary =
        match super::fetch_json("customer", "summary", &config.summary_url, config.timeout).await {
            Ok(summary) => summary,
            Err(response) => return response,
        };
    let (Some(name), Some(balance)) = (
        text_field(&summary, "name"),
        text_field(&summary, "balance"),
    ) else {
        let message = format!(
            "summary service at {} answered without name and balance: {summary}",
            config.summary_url
        );
        access_log::error("customer", &message);
        return (StatusCode::BAD_GATEWAY, format!("{message}\n")).into_response();
    };
    (
        [(CONTENT_TYPE, "text/html; charset=utf-8")],
        render(&name, &balance),
    )
        .into_response()
}

/// There is no session to end: back to the page.
async fn logout() -> Response {
    (StatusCode::FOUND, [(LOCATION, "/")]).into_response()
}

/// The page as the lab's `curl $SVC_HOST` shows it.
pub fn render(name: &str, balance: &str) -> String {
    format!(
        r#"<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"
   "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">

<html xmlns="http://www.w3.org/1999/xhtml">
   <head>
      <title>YAO Bank</title>
      <style>
      h2 {{
         font-family: Arial, Helvetica, sans-serif;
      }}
      h1 {{
         font-family: Arial, Helvetica, sans-serif;
      }}
      p {{
         font-family: Arial, Helvetica, sans-serif;
      }}
      </style>
   </head>
   <body>
      <h1>Welcome to YAO Bank</h1>
      <h2>Name: {}</h2>
      <h2>Balance: {}</h2>
      <p><a href="/logout">Log Out >></a></p>
   </body>
</html>
"#,
        escape(name),
        escape(balance)
    )
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_has_the_labs_lines() {
        let page = render("Spike Curtis", "2389.45");
        for line in [
            "<title>YAO Bank</title>",
            "<h1>Welcome to YAO Bank</h1>",
            "<h2>Name: Spike Curtis</h2>",
            "<h2>Balance: 2389.45</h2>",
            r#"<p><a href="/logout">Log Out >></a></p>"#,
        ] {
            assert!(page.lines().any(|l| l.trim() == line), "missing {line}");
        }
        assert!(page.starts_with("<!DOCTYPE html PUBLIC"));
        assert!(page.ends_with("</html>\n"));
    }

    #[test]
    fn values_are_escaped() {
        let page = render("<script>", "1 & 2");
        assert!(page.contains("<h2>Name: &lt;script&gt;</h2>"));
        assert!(page.contains("<h2>Balance: 1 &amp; 2</h2>"));
    }
}
