//! WeChat Pay v2 times: `yyyyMMddHHmmss` in China Standard Time (`time_end`, `time_start`), and
//! `yyyy-MM-dd HH:mm:ss` (`refund_success_time_$n`).

use chrono::{DateTime, FixedOffset, NaiveDateTime, TimeZone, Utc};

use crate::domain::ParseError;
use crate::text::quote;

/// China Standard Time, the zone of every WeChat Pay v2 timestamp.
pub fn china_standard_time() -> FixedOffset {
    // 8 hours is always a valid offset.
    FixedOffset::east_opt(8 * 3600).unwrap_or_else(|| unreachable!("UTC+8 is a valid offset"))
}

/// Parses WeChat's `yyyyMMddHHmmss` (China Standard Time, e.g. `time_end`) into UTC.
pub fn parse_wechat_time(s: &str) -> Result<DateTime<Utc>, ParseError> {
    if s.len() != 14 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::new(
            "time",
            format!("{} is not yyyyMMddHHmmss", quote(s)),
        ));
    }
    let naive = NaiveDateTime::parse_from_str(s, "%Y%m%d%H%M%S")
        .map_err(|e| ParseError::new("time", format!("{}: {e}", quote(s))))?;
    china_standard_time()
        .from_local_datetime(&naive)
        .single()
        .map(|t| t.with_timezone(&Utc))
        .ok_or_else(|| ParseError::new("time", format!("{} is not a valid time", quote(s))))
}

/// Formats a UTC time as WeChat's `yyyyMMddHHmmss` in China Standard Time.
pub fn format_wechat_time(t: DateTime<Utc>) -> String {
    t.with_timezone(&china_standard_time())
        .format("%Y%m%d%H%M%S")
        .to_string()
}

/// Parses WeChat's `yyyy-MM-dd HH:mm:ss` (China Standard Time, e.g. `refund_success_time_$n`)
/// into UTC.
pub fn parse_wechat_datetime(s: &str) -> Result<DateTime<Utc>, ParseError> {
    let shape_ok = s.len() == 19
        && s.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            10 => b == b' ',
            13 | 16 => b == b':',
            _ => b.is_ascii_digit(),
        });
    if !shape_ok {
        return Err(ParseError::new(
            "time",
            format!("{} is not yyyy-MM-dd HH:mm:ss", quote(s)),
        ));
    }
    let naive = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S")
        .map_err(|e| ParseError::new("time", format!("{}: {e}", quote(s))))?;
    china_standard_time()
        .from_local_datetime(&naive)
        .single()
        .map(|t| t.with_timezone(&Utc))
        .ok_or_else(|| ParseError::new("time", format!("{} is not a valid time", quote(s))))
}

/// Formats a UTC time as WeChat's `yyyy-MM-dd HH:mm:ss` in China Standard Time.
pub fn format_wechat_datetime(t: DateTime<Utc>) -> String {
    t.with_timezone(&china_standard_time())
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refund_success_time_is_china_standard_time() {
        let t = parse_wechat_datetime("2017-12-01 12:56:40").unwrap();
        assert_eq!(t.to_rfc3339(), "2017-12-01T04:56:40+00:00");
        assert_eq!(format_wechat_datetime(t), "2017-12-01 12:56:40");
        for bad in [
            "20171201125640",
            "2017-12-01T12:56:40",
            "2017-13-01 12:56:40",
            "2017-12-01 12:56:4",
        ] {
            assert!(parse_wechat_datetime(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wechat_time_is_china_standard_time() {
        let t = parse_wechat_time("20141111170043").unwrap();
        assert_eq!(t.to_rfc3339(), "2014-11-11T09:00:43+00:00");
        assert_eq!(format_wechat_time(t), "20141111170043");
        assert!(parse_wechat_time("20141311170043").is_err());
        assert!(parse_wechat_time("2014-11-11").is_err());
    }

    #[test]
    fn a_bad_time_is_quoted_short_and_escaped() {
        let huge = format!("\"\n{}", "\"".repeat(40_000));
        let shown = parse_wechat_time(&huge).unwrap_err().to_string();
        assert!(shown.len() < 300 && !shown.contains('\n'), "{shown}");
    }
}
