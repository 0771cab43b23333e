//! The latency CSV (`--latency-csv`): one row per completed inference request, the shape TorchServe
//! users build from "Inference complete" log records, ready for pandas or gnuplot.

use std::fmt::Write as _;

use crate::sink::{Record, rfc3339_micros};

/// The first line of every CSV file (RFC 4180 header row).
pub const HEADER: &str = "timestamp,model,version,status,latency_ms\n";

/// Appends the row of `r`. Latency is TorchServe's (request complete → response status line), in
/// milliseconds with microsecond precision. Records without a model or latency (which the CSV sink
/// never receives) give no row.
pub fn row(r: &Record, out: &mut Vec<u8>) {
    let (Some(model), Some(latency_us)) = (r.model.as_deref(), r.latency_us) else {
        return;
    };
    let mut s = String::with_capacity(96);
    s.push_str(&rfc3339_micros(r.unix_ns));
    s.push(',');
    push_field(&mut s, model);
    s.push(',');
    push_field(&mut s, r.version.as_deref().unwrap_or(""));
    // Whole microseconds printed as milliseconds, so the decimals are exact (no binary rounding).
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a latency is a non-negative span far below 2^64 µs; `as` saturates anyway"
    )]
    let us = latency_us.round() as u64;
    let _ = writeln!(s, ",{},{}.{:03}", r.status, us / 1000, us % 1000);
    out.extend_from_slice(s.as_bytes());
}

/// RFC 4180: a field with a comma, quote or line break is quoted, its quotes doubled. Model names
/// come from URLs and may hold any of them.
fn push_field(s: &mut String, field: &str) {
    if field.contains([',', '"', '\r', '\n']) {
        s.push('"');
        s.push_str(&field.replace('"', "\"\""));
        s.push('"');
    } else {
        s.push_str(field);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::{clock::WallClock, tests::exchange};

    fn record(target: &str, status: u16) -> Record {
        Record::from_exchange(
            &exchange(target, status),
            "vm",
            &mut WallClock::fixed(1_700_000_000_000_000_000),
        )
    }

    #[test]
    fn header_and_rows() {
        assert_eq!(HEADER, "timestamp,model,version,status,latency_ms\n");
        let mut out = Vec::new();
        row(&record("/predictions/resnet18/1.0", 200), &mut out);
        row(&record("/predictions/resnet18", 503), &mut out);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "2023-11-14T22:13:20.014000Z,resnet18,1.0,200,12.346\n\
             2023-11-14T22:13:20.014000Z,resnet18,default,503,12.346\n"
        );
    }

    #[test]
    fn awkward_model_names_are_quoted() {
        let mut out = Vec::new();
        row(&record("/predictions/a%2Cb%22c", 200), &mut out);
        assert!(
            String::from_utf8_lossy(&out)
                .starts_with("2023-11-14T22:13:20.014000Z,\"a,b\"\"c\",default,"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }

    #[test]
    fn no_row_without_model_or_latency() {
        let mut out = Vec::new();
        row(&record("/ping", 200), &mut out);
        let mut r = record("/predictions/m", 200);
        r.latency_us = None;
        row(&r, &mut out);
        assert!(out.is_empty());
    }
}
