/// Numbers of the NBD protocol (NetworkBlockDevice/nbd `doc/proto.md`), in one place.
/// Everything on the wire is big-endian.
enum NBDMagic {
    /// "NBDMAGIC", first 8 bytes the server sends.
    static let server: UInt64 = 0x4E42_444D_4147_4943
    /// "IHAVEOPT": second server word and the prefix of every client option.
    static let option: UInt64 = 0x4948_4156_454F_5054
    /// Prefix of every option reply.
    static let optionReply: UInt64 = 0x0003_E889_0455_65A9
    /// Prefix of every transmission request (28-byte header).
    static let request: UInt32 = 0x2560_9513
    /// Prefix of a simple reply (16-byte header).
    static let simpleReply: UInt32 = 0x6744_6698
    /// Prefix of a structured reply chunk (20-byte header).
    static let structuredReply: UInt32 = 0x668E_33EF
}

/// Handshake flags (server, 16 bits) and client flags (32 bits).
enum NBDHandshakeFlag {
    static let fixedNewstyle: UInt16 = 1 << 0
    static let noZeroes: UInt16 = 1 << 1
    static let clientFixedNewstyle: UInt32 = 1 << 0
    static let clientNoZeroes: UInt32 = 1 << 1
    static let clientKnown: UInt32 = clientFixedNewstyle | clientNoZeroes
}

/// Transmission flags (16 bits) sent with the export size.
enum NBDTransmissionFlag {
    static let hasFlags: UInt16 = 1 << 0
    static let readOnly: UInt16 = 1 << 1
    static let sendFlush: UInt16 = 1 << 2
    static let sendFUA: UInt16 = 1 << 3
    static let sendTrim: UInt16 = 1 << 5
    static let sendWriteZeroes: UInt16 = 1 << 6
    static let sendDF: UInt16 = 1 << 7
    static let canMultiConn: UInt16 = 1 << 8
    static let sendCache: UInt16 = 1 << 10
}

/// Option codes (`NBD_OPT_*`).
enum NBDOption {
    static let exportName: UInt32 = 1
    static let abort: UInt32 = 2
    static let list: UInt32 = 3
    static let startTLS: UInt32 = 5
    static let info: UInt32 = 6
    static let go: UInt32 = 7
    static let structuredReply: UInt32 = 8
    static let listMetaContext: UInt32 = 9
    static let setMetaContext: UInt32 = 10
}

/// Option reply types (`NBD_REP_*`); errors have bit 31 set.
enum NBDOptionReply {
    static let ack: UInt32 = 1
    static let server: UInt32 = 2
    static let info: UInt32 = 3
    static let metaContext: UInt32 = 4
    static let errUnsupported: UInt32 = 0x8000_0001
    static let errPolicy: UInt32 = 0x8000_0002
    static let errInvalid: UInt32 = 0x8000_0003
    static let errUnknown: UInt32 = 0x8000_0006
    static let errTooBig: UInt32 = 0x8000_0009
}

/// Information items of `NBD_REP_INFO` (`NBD_INFO_*`).
enum NBDInfo {
    static let export: UInt16 = 0
    static let name: UInt16 = 1
    static let description: UInt16 = 2
    static let blockSize: UInt16 = 3
}

/// Command types (`NBD_CMD_*`).
enum NBDCommand {
    static let read: UInt16 = 0
    static let write: UInt16 = 1
    static let disconnect: UInt16 = 2
    static let flush: UInt16 = 3
    static let trim: UInt16 = 4
    static let cache: UInt16 = 5
    static let writeZeroes: UInt16 = 6
    static let blockStatus: UInt16 = 7
}

/// Command flags (`NBD_CMD_FLAG_*`).
enum NBDCommandFlag {
    static let fua: UInt16 = 1 << 0
    static let noHole: UInt16 = 1 << 1
    static let dontFragment: UInt16 = 1 << 2
    static let reqOne: UInt16 = 1 << 3
}

/// Structured reply chunk types and flags (`NBD_REPLY_*`).
enum NBDReplyType {
    static let flagDone: UInt16 = 1 << 0
    static let none: UInt16 = 0
    static let offsetData: UInt16 = 1
    static let offsetHole: UInt16 = 2
    static let blockStatus: UInt16 = 5
    static let error: UInt16 = 0x8001
}

/// Error values of replies (the protocol fixes them; they happen to match Linux errno).
enum NBDError {
    static let ok: UInt32 = 0
    static let permission: UInt32 = 1  // EPERM
    static let io: UInt32 = 5  // EIO
    static let noMemory: UInt32 = 12  // ENOMEM
    static let invalid: UInt32 = 22  // EINVAL
    static let noSpace: UInt32 = 28  // ENOSPC
    static let overflow: UInt32 = 75  // EOVERFLOW
    static let notSupported: UInt32 = 95  // ENOTSUP
}

/// `base:allocation` status bits.
enum NBDAllocation {
    static let contextName = "base:allocation"
    /// The id this server gives `base:allocation` in `NBD_REP_META_CONTEXT`.
    static let contextID: UInt32 = 1
    static let hole: UInt32 = 1 << 0
    static let zero: UInt32 = 1 << 1
}

/// A decoded transmission request header.
struct NBDRequest: Sendable {
    var flags: UInt16
    var type: UInt16
    var handle: UInt64
    var offset: UInt64
    var length: UInt32

    static let headerSize = 28
}
