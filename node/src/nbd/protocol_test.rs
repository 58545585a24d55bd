//! Byte-level tests of the NBD wire format: every layout against bytes
//! written out by hand from the spec, and every validation rule.

use super::*;

fn header(command: Command, flags: u16, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        flags,
        command,
        cookie: 0xdead_beef_0000_0001,
        offset,
        length,
    }
}

fn limits(size_bytes: u64) -> RequestLimits {
    RequestLimits {
        size_bytes,
        read_only: false,
        request_bytes_max: NBD_REQUEST_BYTES_MAX,
        structured_replies: false,
    }
}

#[test]
fn greeting_is_nbdmagic_ihaveopt_and_flags() {
    let greeting = encode_greeting();
    assert_eq!(&greeting[0..8], b"NBDMAGIC");
    assert_eq!(&greeting[8..16], b"IHAVEOPT");
    assert_eq!(&greeting[16..18], &[0x00, 0x03]);
}

#[test]
fn client_flags_accept_known_bits_and_reject_others() {
    assert_eq!(decode_client_flags(0), Ok(ClientFlags::default()));
    assert_eq!(
        decode_client_flags(3),
        Ok(ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true
        })
    );
    assert_eq!(decode_client_flags(1 << 2), Err(4));
    assert_eq!(decode_client_flags(0x8000_0001), Err(0x8000_0001));
}

#[test]
fn option_header_round_trips_and_rejects_bad_magic() {
    let mut raw = [0u8; NBD_OPTION_HEADER_BYTES];
    raw[0..8].copy_from_slice(b"IHAVEOPT");
    raw[8..12].copy_from_slice(&7u32.to_be_bytes());
    raw[12..16].copy_from_slice(&300u32.to_be_bytes());
    assert_eq!(
        decode_option_header(&raw),
        Ok(OptionHeader {
            option: 7,
            length: 300
        })
    );
    raw[0] = b'X';
    assert!(decode_option_header(&raw).is_err());
}

#[test]
fn option_reply_layout() {
    let mut out = BytesMut::new();
    encode_option_reply(&mut out, NBD_OPT_LIST, NBD_REP_ERR_UNSUP, b"no");
    let expected: Vec<u8> = [
        &[0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9][..],
        &[0, 0, 0, 3],
        &[0x80, 0, 0, 1],
        &[0, 0, 0, 2],
        b"no",
    ]
    .concat();
    assert_eq!(&out[..], &expected[..]);
}

#[test]
fn rep_server_carries_name_length_name_and_description() {
    let data = encode_rep_server("t/v", "disk");
    assert_eq!(data, [&[0, 0, 0, 3][..], b"t/v", b"disk"].concat());
}

#[test]
fn info_replies_have_the_spec_lengths() {
    let export = encode_info_export(0x0102_0304_0506_0708, 0x0155);
    assert_eq!(export, [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0x01, 0x55]);
    let block = encode_info_block_size(1, 4096, NBD_REQUEST_BYTES_MAX);
    assert_eq!(block, [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);
    assert_eq!(
        encode_info_string(NBD_INFO_NAME, "t/v"),
        [&[0, 1][..], b"t/v"].concat()
    );
}

fn info_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name);
    data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for info in infos {
        data.extend_from_slice(&info.to_be_bytes());
    }
    data
}

#[test]
fn info_request_decodes_name_and_info_list() {
    let request = decode_info_request(&info_data(b"tenant/vol", &[3, 1, 99])).unwrap();
    assert_eq!(request.name, "tenant/vol");
    assert_eq!(request.info_types, [3, 1, 99]);
    assert!(request.wants(NBD_INFO_NAME));
    assert!(!request.wants(NBD_INFO_DESCRIPTION));
    let empty = decode_info_request(&info_data(b"", &[])).unwrap();
    assert_eq!(empty.name, "");
    assert!(empty.info_types.is_empty());
}

#[test]
fn info_request_rejects_every_malformed_length() {
    assert!(matches!(
        decode_info_request(&[0; 5]),
        Err(OptionDataError::TooShort { .. })
    ));
    // Name length pointing past the data.
    let mut data = info_data(b"abc", &[]);
    data[3] = 10;
    assert!(matches!(
        decode_info_request(&data),
        Err(OptionDataError::NameOverrun { .. })
    ));
    // Name length u32::MAX must not overflow anything.
    data[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        decode_info_request(&data),
        Err(OptionDataError::NameOverrun { .. })
    ));
    // Info count disagreeing with the remaining bytes, both ways.
    let mut data = info_data(b"abc", &[1]);
    data.push(0);
    assert!(matches!(
        decode_info_request(&data),
        Err(OptionDataError::InfoCountMismatch { .. })
    ));
    let mut data = info_data(b"abc", &[1, 2]);
    data.truncate(data.len() - 2);
    assert!(matches!(
        decode_info_request(&data),
        Err(OptionDataError::InfoCountMismatch { .. })
    ));
    // Not text.
    assert_eq!(
        decode_info_request(&info_data(b"a\0b", &[])),
        Err(OptionDataError::NameNotText)
    );
    assert_eq!(
        decode_info_request(&info_data(&[0xff, 0xfe], &[])),
        Err(OptionDataError::NameNotText)
    );
}

#[test]
fn names_over_4096_bytes_are_rejected() {
    assert!(decode_name(&[b'a'; NBD_STRING_BYTES_MAX]).is_ok());
    assert!(matches!(
        decode_name(&[b'a'; NBD_STRING_BYTES_MAX + 1]),
        Err(OptionDataError::NameTooLong { .. })
    ));
}

#[test]
fn truncated_input_never_panics() {
    // Every prefix of a valid INFO request is either valid or an error.
    let data = info_data(b"tenant/volume", &[0, 1, 2, 3]);
    for end in 0..=data.len() {
        let _ = decode_info_request(&data[..end]);
    }
}

#[test]
fn export_name_reply_honours_no_zeroes() {
    let with = encode_export_name_reply(4096, 0x0003, false);
    assert_eq!(with.len(), 134);
    assert_eq!(&with[0..10], &[0, 0, 0, 0, 0, 0, 0x10, 0, 0, 3]);
    assert!(with[10..].iter().all(|&b| b == 0));
    assert_eq!(encode_export_name_reply(4096, 0x0003, true).len(), 10);
}

#[test]
fn transmission_flags_advertise_what_the_server_does() {
    let rw = transmission_flags(false, false);
    for flag in [
        NBD_FLAG_HAS_FLAGS,
        NBD_FLAG_SEND_FLUSH,
        NBD_FLAG_SEND_FUA,
        NBD_FLAG_SEND_TRIM,
        NBD_FLAG_SEND_WRITE_ZEROES,
        NBD_FLAG_CAN_MULTI_CONN,
    ] {
        assert_ne!(rw & flag, 0, "flag {flag:#x}");
    }
    for flag in [
        NBD_FLAG_READ_ONLY,
        NBD_FLAG_SEND_DF,
        NBD_FLAG_ROTATIONAL,
        NBD_FLAG_SEND_RESIZE,
        NBD_FLAG_SEND_CACHE,
        NBD_FLAG_SEND_FAST_ZERO,
    ] {
        assert_eq!(rw & flag, 0, "flag {flag:#x}");
    }
    assert_ne!(transmission_flags(true, false) & NBD_FLAG_READ_ONLY, 0);
    // DF only with structured replies (the spec forbids it otherwise).
    assert_ne!(transmission_flags(false, true) & NBD_FLAG_SEND_DF, 0);
}

#[test]
fn request_header_round_trips() {
    let request = header(Command::Write, NBD_CMD_FLAG_FUA, 1 << 40, 65536);
    let raw = request.encode();
    assert_eq!(&raw[0..4], &[0x25, 0x60, 0x95, 0x13]);
    assert_eq!(decode_request_header(&raw), Ok(request));
    let other = header(Command::Other(42), 0, 0, 0);
    assert_eq!(decode_request_header(&other.encode()), Ok(other));
    assert_eq!(Command::from_wire(NBD_CMD_CACHE), Command::Other(5));
}

#[test]
fn request_header_rejects_bad_and_extended_magic() {
    let mut raw = header(Command::Read, 0, 0, 512).encode();
    raw[0..4].copy_from_slice(&NBD_EXTENDED_REQUEST_MAGIC.to_be_bytes());
    assert_eq!(decode_request_header(&raw), Err(NBD_EXTENDED_REQUEST_MAGIC));
    raw[0..4].copy_from_slice(b"GET ");
    assert!(decode_request_header(&raw).is_err());
}

#[test]
fn payload_plan_reads_discards_or_disconnects_writes_only() {
    let max = NBD_REQUEST_BYTES_MAX;
    let plan = |command, length| plan_payload(&header(command, 0, 0, length), max);
    assert_eq!(plan(Command::Read, u32::MAX), PayloadPlan::None);
    assert_eq!(plan(Command::Trim, u32::MAX), PayloadPlan::None);
    assert_eq!(plan(Command::Other(99), u32::MAX), PayloadPlan::None);
    assert_eq!(plan(Command::Write, 0), PayloadPlan::Read);
    assert_eq!(plan(Command::Write, max), PayloadPlan::Read);
    assert_eq!(plan(Command::Write, max + 1), PayloadPlan::Discard);
    assert_eq!(
        plan(Command::Write, NBD_WRITE_DISCARD_BYTES_MAX),
        PayloadPlan::Discard
    );
    assert_eq!(
        plan(Command::Write, NBD_WRITE_DISCARD_BYTES_MAX + 1),
        PayloadPlan::Disconnect
    );
}

fn errno_of(request: RequestHeader, limits: &RequestLimits) -> Option<Errno> {
    validate_request(&request, limits)
        .err()
        .map(|(errno, _)| errno)
}

#[test]
fn requests_inside_the_export_are_valid() {
    let l = limits(1 << 20);
    for command in [
        Command::Read,
        Command::Write,
        Command::Trim,
        Command::WriteZeroes,
    ] {
        assert_eq!(
            errno_of(header(command, 0, 0, 1 << 20), &l),
            None,
            "{command:?}"
        );
        assert_eq!(
            errno_of(header(command, NBD_CMD_FLAG_FUA, 4096, 4096), &l),
            None
        );
        // Zero-length requests are valid no-ops, even at the very end.
        assert_eq!(errno_of(header(command, 0, 1 << 20, 0), &l), None);
    }
    // FLUSH's offset and length are reserved; they are ignored, not checked.
    assert_eq!(errno_of(header(Command::Flush, 0, u64::MAX, 7), &l), None);
    assert_eq!(
        errno_of(
            header(
                Command::WriteZeroes,
                NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA,
                0,
                1
            ),
            &l
        ),
        None
    );
}

#[test]
fn past_the_end_is_einval_for_read_and_trim_enospc_for_writes() {
    let l = limits(1 << 20);
    let past = |command| errno_of(header(command, 0, (1 << 20) - 512, 1024), &l);
    assert_eq!(past(Command::Read), Some(Errno::Inval));
    assert_eq!(past(Command::Trim), Some(Errno::Inval));
    assert_eq!(past(Command::Write), Some(Errno::NoSpc));
    assert_eq!(past(Command::WriteZeroes), Some(Errno::NoSpc));
    // offset + length overflowing u64 is past the end, not a panic.
    assert_eq!(
        errno_of(header(Command::Read, 0, u64::MAX, 2), &l),
        Some(Errno::Inval)
    );
    // An offset past the end with length 0 is still out of bounds.
    assert_eq!(
        errno_of(header(Command::Read, 0, (1 << 20) + 1, 0), &l),
        Some(Errno::Inval)
    );
}

#[test]
fn oversized_payloads_follow_the_spec() {
    let mut l = limits(u64::MAX);
    let big = NBD_REQUEST_BYTES_MAX + 1;
    assert_eq!(
        errno_of(header(Command::Read, 0, 0, big), &l),
        Some(Errno::Inval)
    );
    assert_eq!(
        errno_of(header(Command::Write, 0, 0, big), &l),
        Some(Errno::Inval)
    );
    // Payload-less commands are not capped by the maximum payload.
    assert_eq!(errno_of(header(Command::Trim, 0, 0, u32::MAX), &l), None);
    assert_eq!(
        errno_of(header(Command::WriteZeroes, 0, 0, u32::MAX), &l),
        None
    );
    l.structured_replies = true;
    assert_eq!(
        errno_of(header(Command::Read, 0, 0, big), &l),
        Some(Errno::Overflow)
    );
    assert_eq!(
        errno_of(header(Command::Write, 0, 0, big), &l),
        Some(Errno::Inval)
    );
}

#[test]
fn read_only_exports_refuse_every_write_with_eperm() {
    let mut l = limits(1 << 20);
    l.read_only = true;
    assert_eq!(
        errno_of(header(Command::Write, 0, 0, 512), &l),
        Some(Errno::Perm)
    );
    assert_eq!(
        errno_of(header(Command::Trim, 0, 0, 512), &l),
        Some(Errno::Perm)
    );
    assert_eq!(
        errno_of(header(Command::WriteZeroes, 0, 0, 512), &l),
        Some(Errno::Perm)
    );
    assert_eq!(errno_of(header(Command::Read, 0, 0, 512), &l), None);
    assert_eq!(errno_of(header(Command::Flush, 0, 0, 0), &l), None);
}

#[test]
fn unknown_commands_and_flags_are_einval() {
    let mut l = limits(1 << 20);
    for command in [NBD_CMD_CACHE, NBD_CMD_BLOCK_STATUS, NBD_CMD_RESIZE, 0xffff] {
        let request = header(Command::from_wire(command), 0, 0, 512);
        assert_eq!(
            errno_of(request, &l),
            Some(Errno::Inval),
            "command {command}"
        );
    }
    let bad_flag = |command, flag| errno_of(header(command, flag, 0, 512), &l);
    assert_eq!(
        bad_flag(Command::Write, NBD_CMD_FLAG_NO_HOLE),
        Some(Errno::Inval)
    );
    assert_eq!(
        bad_flag(Command::WriteZeroes, NBD_CMD_FLAG_FAST_ZERO),
        Some(Errno::Inval)
    );
    assert_eq!(
        bad_flag(Command::Trim, NBD_CMD_FLAG_REQ_ONE),
        Some(Errno::Inval)
    );
    assert_eq!(
        bad_flag(Command::Read, NBD_CMD_FLAG_PAYLOAD_LEN),
        Some(Errno::Inval)
    );
    assert_eq!(bad_flag(Command::Read, 1 << 15), Some(Errno::Inval));
    // DF is only valid once structured replies (and so SEND_DF) are on.
    assert_eq!(bad_flag(Command::Read, NBD_CMD_FLAG_DF), Some(Errno::Inval));
    l.structured_replies = true;
    assert_eq!(
        errno_of(header(Command::Read, NBD_CMD_FLAG_DF, 0, 512), &l),
        None
    );
}

#[test]
fn simple_replies_encode_header_and_body() {
    let mut head = BytesMut::new();
    let body = Reply::Simple {
        cookie: 0x0102_0304_0506_0708,
        errno: 0,
        data: Some(Bytes::from_static(b"abc")),
    }
    .encode(&mut head);
    assert_eq!(
        &head[..],
        &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    );
    assert_eq!(body.as_deref(), Some(&b"abc"[..]));

    let mut head = BytesMut::new();
    let body = Reply::Simple {
        cookie: 9,
        errno: Errno::NoSpc.wire(),
        data: None,
    }
    .encode(&mut head);
    assert_eq!(&head[4..8], &[0, 0, 0, 28]);
    assert_eq!(body, None);
}

#[test]
fn structured_read_is_one_offset_data_chunk_flagged_done() {
    let mut head = BytesMut::new();
    let data = Bytes::from(vec![7u8; 1000]);
    let body = Reply::OffsetData {
        cookie: 5,
        offset: 4096,
        data: data.clone(),
    }
    .encode(&mut head);
    let expected: Vec<u8> = [
        &[0x66, 0x8e, 0x33, 0xef][..],
        &[0, 1],
        &[0, 1],
        &5u64.to_be_bytes(),
        &1008u32.to_be_bytes(),
        &4096u64.to_be_bytes(),
    ]
    .concat();
    assert_eq!(&head[..], &expected[..]);
    assert_eq!(body, Some(data));

    let mut head = BytesMut::new();
    assert_eq!(Reply::Done { cookie: 6 }.encode(&mut head), None);
    assert_eq!(&head[4..8], &[0, 1, 0, 0]);
    assert_eq!(&head[16..20], &[0, 0, 0, 0]);
}

#[test]
fn error_chunk_carries_errno_and_message() {
    let mut head = BytesMut::new();
    let reply = Reply::Error {
        cookie: 1,
        errno: Errno::Inval,
        message: "bad".to_owned(),
    };
    assert_eq!(reply.encode(&mut head), None);
    assert_eq!(&head[4..6], &[0, 1]);
    assert_eq!(&head[6..8], &[0x80, 0x01]);
    assert_eq!(&head[16..20], &9u32.to_be_bytes());
    assert_eq!(&head[20..24], &22u32.to_be_bytes());
    assert_eq!(&head[24..26], &3u16.to_be_bytes());
    assert_eq!(&head[26..], b"bad");
    assert_eq!(head.len(), NBD_STRUCTURED_REPLY_HEADER_BYTES + 9);
}

#[test]
fn long_error_messages_are_truncated_on_a_char_boundary() {
    let message = "é".repeat(3000); // 6000 bytes
    let mut head = BytesMut::new();
    Reply::Error {
        cookie: 1,
        errno: Errno::Io,
        message,
    }
    .encode(&mut head);
    let message_bytes = u16::from_be_bytes([head[24], head[25]]) as usize;
    assert_eq!(message_bytes, NBD_STRING_BYTES_MAX);
    assert!(std::str::from_utf8(&head[26..]).is_ok());
    assert_eq!(truncate_utf8("aé", 2), "a");
}

#[test]
fn random_bytes_never_panic_the_decoders() {
    // A deterministic xorshift stands in for a fuzzer until the NBD parser
    // gets its fuzz target (STYLE.md); it would drive these same functions.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let l = RequestLimits {
        size_bytes: 1 << 30,
        read_only: false,
        request_bytes_max: NBD_REQUEST_BYTES_MAX,
        structured_replies: true,
    };
    for _ in 0..20_000 {
        let len = (next() % 64) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if len >= 4 && next() % 2 == 0 {
            // Make the name length plausible half of the time.
            let name_len = (next() % (len as u64 + 2)) as u32;
            data[0..4].copy_from_slice(&name_len.to_be_bytes());
        }
        let _ = decode_info_request(&data);
        let _ = decode_name(&data);
        let mut raw = [0u8; NBD_REQUEST_HEADER_BYTES];
        raw.iter_mut().for_each(|b| *b = next() as u8);
        raw[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        let request = decode_request_header(&raw).expect("magic is right");
        let _ = validate_request(&request, &l);
        let _ = plan_payload(&request, l.request_bytes_max);
    }
}
