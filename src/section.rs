//! What every config section is made of: the error a bad setting gives, range checks that
//! name the setting, defaults read from clap's own attributes, and the [`Section`] trait each
//! section implements beside its feature. `config` lists the sections; a feature imports only
//! this module, never the list.

use std::path::{Path, PathBuf};

use clap::{Args, Command, FromArgMatches};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

pub fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// One section of the config (`[tasks]`, `[cache]`, …), defined beside the feature it
/// configures and listed once in `config`.
pub trait Section {
    /// Checks the values once at start; the error names the setting.
    fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
    /// Hides secrets before the section is printed (`infergate config`).
    fn redact(&mut self) {}
}

/// A section's defaults: what clap gives it with no flag and no variable.
pub fn defaults<T: Args + FromArgMatches>() -> T {
    let cmd = T::augment_args(Command::new("defaults")).mut_args(|a| a.env(None::<&'static str>));
    let m = cmd
        .try_get_matches_from(["defaults"])
        .expect("every setting has a default or is optional");
    T::from_arg_matches(&m).expect("defaults parse into their own types")
}

/// `Default` from clap's attributes, so `T::default()`, a file's missing keys and `--help`
/// all read the same attribute.
macro_rules! clap_defaults {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                $crate::section::defaults()
            }
        }
    )*};
}
pub(crate) use clap_defaults;

/// Range checks that name the setting by its section and field, so the name is not written a
/// second time: `bounds!(self, "server", { max_request_bytes: 1024..=2 << 30 })`.
macro_rules! bounds {
    ($s:expr, $section:literal, { $($field:ident: $lo:literal ..= $hi:expr),* $(,)? }) => {
        $( $crate::section::in_range(
            concat!($section, ".", stringify!($field)),
            $s.$field as u64,
            $lo,
            ($hi) as u64,
        )?; )*
    };
}
pub(crate) use bounds;

pub fn in_range(field: &'static str, v: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if v < min || v > max {
        return Err(invalid(field, format!("{v} is outside {min}..={max}")));
    }
    Ok(())
}

/// A PEM file that is named must be there; what is in it is checked when it is loaded.
pub fn readable(field: &'static str, path: Option<&Path>) -> Result<(), ConfigError> {
    let path = path.ok_or_else(|| invalid(field, "is required"))?;
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| invalid(field, format!("cannot read '{}': {e}", path.display())))
}

/// An `http(s)://host:port` URL, or an error naming the setting and an example.
pub fn validate_url(field: &'static str, url: &str, example: &str) -> Result<(), ConfigError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| invalid(field, format!("'{url}' is not a URL: {e}")))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(invalid(
            field,
            format!("'{url}' must start with http:// or https://"),
        ));
    }
    if uri.host().is_none() || uri.port_u16().is_none() {
        return Err(invalid(
            field,
            format!("'{url}' needs a host and a port, e.g. {example}"),
        ));
    }
    Ok(())
}

/// A `redis://` or `rediss://` URL (the broker, the store and the cache accept either).
pub fn is_redis(url: &str) -> bool {
    url.starts_with("redis://") || url.starts_with("rediss://")
}
