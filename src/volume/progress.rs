//! Progress bars for long volume operations (import, export, hydrate) on
//! a terminal; hidden when not asked for.

/// A bar of `len` steps labelled `what`, or a hidden one when `on` is false.
pub fn bar(on: bool, len: u64, what: &str) -> indicatif::ProgressBar {
    if !on {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template("{msg:>8} [{bar:40}] {pos}/{len} ({eta})")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    b.set_style(style);
    b.set_message(what.to_string());
    b
}
