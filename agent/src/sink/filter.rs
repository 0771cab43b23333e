//! Which records a sink writes: by model, by status class, and a sampling rate.

use std::collections::BTreeSet;

use crate::sink::Record;

/// Sampling rates are kept in parts per million so that the sampler's arithmetic is exact.
pub const PPM: u32 = 1_000_000;

/// A sink's record filter. The default admits everything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// Only these models (records without a model, such as `/ping`, are then left out).
    models: Option<BTreeSet<String>>,
    /// Bit `c` set: status class `c`xx admitted.
    classes: Option<u8>,
    /// Fraction of the matching records written, in parts per million.
    rate_ppm: u32,
    /// Sampler state: credit in ppm; a record is taken each time it reaches one whole record.
    credit: u32,
}

impl Default for Filter {
    fn default() -> Self {
        Filter {
            models: None,
            classes: None,
            rate_ppm: PPM,
            credit: 0,
        }
    }
}

impl Filter {
    /// `models`/`classes` of `None` admit all; `classes` holds status classes 1–5; `rate_ppm` at most
    /// [`PPM`].
    pub fn new(models: Option<BTreeSet<String>>, classes: Option<&[u8]>, rate_ppm: u32) -> Filter {
        Filter {
            models,
            classes: classes.map(|cs| cs.iter().fold(0u8, |m, c| m | (1 << c))),
            rate_ppm: rate_ppm.min(PPM),
            credit: 0,
        }
    }

    /// Whether `r` is written. Sampling is deterministic error diffusion, not random: a rate of 0.25
    /// takes exactly every fourth matching record, so counts stay predictable.
    pub fn admit(&mut self, r: &Record) -> bool {
        if let Some(models) = &self.models
            && !r.model.as_ref().is_some_and(|m| models.contains(m))
        {
            return false;
        }
        if let Some(mask) = self.classes
            && r.status_class().is_none_or(|c| mask & (1 << c) == 0)
        {
            return false;
        }
        self.credit += self.rate_ppm;
        if self.credit >= PPM {
            self.credit -= PPM;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::{Api, Record};

    fn rec(model: Option<&str>, status: u16) -> Record {
        Record {
            unix_ns: 0,
            hostname: "h".into(),
            pid: 1,
            client: None,
            method: Some("POST".into()),
            path: Some("/p".into()),
            api: if model.is_some() {
                Api::Inference
            } else {
                Api::Other
            },
            model: model.map(str::to_owned),
            version: model.map(|_| "default".to_owned()),
            status,
            latency_us: Some(1.0),
            total_us: Some(2.0),
            request_bytes: Some(1),
            response_bytes: 1,
            request_id: None,
            complete: true,
        }
    }

    #[test]
    fn default_admits_everything() {
        let mut f = Filter::default();
        assert!(f.admit(&rec(None, 200)));
        assert!(f.admit(&rec(Some("m"), 599)));
        assert!(f.admit(&rec(Some("m"), 0)));
    }

    #[test]
    fn by_model_and_class() {
        let models = Some(["a".to_owned(), "b".to_owned()].into());
        let mut f = Filter::new(models, Some(&[4, 5]), PPM);
        assert!(f.admit(&rec(Some("a"), 503)));
        assert!(f.admit(&rec(Some("b"), 404)));
        assert!(!f.admit(&rec(Some("a"), 200)));
        assert!(!f.admit(&rec(Some("c"), 500)));
        assert!(!f.admit(&rec(None, 500)));
        assert!(!f.admit(&rec(Some("a"), 600)));
    }

    #[test]
    fn sampling_is_exact() {
        let mut f = Filter::new(None, None, PPM / 4);
        let taken: Vec<bool> = (0..8).map(|_| f.admit(&rec(Some("m"), 200))).collect();
        assert_eq!(
            taken,
            [false, false, false, true, false, false, false, true]
        );
        let mut f = Filter::new(None, None, 100_000);
        assert_eq!((0..1000).filter(|_| f.admit(&rec(None, 200))).count(), 100);
        let mut none = Filter::new(None, None, 0);
        assert!((0..100).all(|_| !none.admit(&rec(None, 200))));
    }
}
