// Numbers of the NBD protocol shared by Cairn's NBD server (target NBDServer) and its NBD client
// (target QEMU), which sit on different layers: NetworkBlockDevice/nbd `doc/proto.md` and
// QEMU's docs/interop/nbd.rst.

/// Magic numbers. Everything on the wire is big-endian.
package enum NBDMagic {
    /// "NBDMAGIC", first 8 bytes the server sends.
    package static let server: UInt64 = 0x4E42_444D_4147_4943
    /// "IHAVEOPT": second server word and the prefix of every client option.
    package static let option: UInt64 = 0x4948_4156_454F_5054
    /// Prefix of every option reply.
    package static let optionReply: UInt64 = 0x0003_E889_0455_65A9
    /// Prefix of every transmission request (28-byte header).
    package static let request: UInt32 = 0x2560_9513
    /// Prefix of a simple reply (16-byte header).
    package static let simpleReply: UInt32 = 0x6744_6698
    /// Prefix of a structured reply chunk (20-byte header).
    package static let structuredReply: UInt32 = 0x668E_33EF
    /// The second word of an oldstyle greeting (Cairn supports newstyle only).
    package static let oldstyle: UInt64 = 0x0000_4202_8186_1253
}

/// Handshake flags (server, 16 bits) and client flags (32 bits).
package enum NBDHandshakeFlag {
    package static let fixedNewstyle: UInt16 = 1 << 0
    package static let noZeroes: UInt16 = 1 << 1
    package static let clientFixedNewstyle: UInt32 = 1 << 0
    package static let clientNoZeroes: UInt32 = 1 << 1
    package static let clientKnown: UInt32 = clientFixedNewstyle | clientNoZeroes
}

/// Transmission flags (16 bits) sent with the export size.
package enum NBDTransmissionFlag {
    package static let hasFlags: UInt16 = 1 << 0
    package static let readOnly: UInt16 = 1 << 1
    package static let sendFlush: UInt16 = 1 << 2
    package static let sendFUA: UInt16 = 1 << 3
    package static let sendTrim: UInt16 = 1 << 5
    package static let sendWriteZeroes: UInt16 = 1 << 6
    package static let sendDF: UInt16 = 1 << 7
    package static let canMultiConn: UInt16 = 1 << 8
    package static let sendCache: UInt16 = 1 << 10
}

/// Option codes (`NBD_OPT_*`).
package enum NBDOption {
    package static let exportName: UInt32 = 1
    package static let abort: UInt32 = 2
    package static let list: UInt32 = 3
    package static let startTLS: UInt32 = 5
    package static let info: UInt32 = 6
    package static let go: UInt32 = 7
    package static let structuredReply: UInt32 = 8
    package static let listMetaContext: UInt32 = 9
    package static let setMetaContext: UInt32 = 10
}

/// Option reply types (`NBD_REP_*`); errors have bit 31 set.
package enum NBDOptionReply {
    package static let ack: UInt32 = 1
    package static let server: UInt32 = 2
    package static let info: UInt32 = 3
    package static let metaContext: UInt32 = 4
    package static let errUnsupported: UInt32 = 0x8000_0001
    package static let errPolicy: UInt32 = 0x8000_0002
    package static let errInvalid: UInt32 = 0x8000_0003
    package static let errUnknown: UInt32 = 0x8000_0006
    package static let errTooBig: UInt32 = 0x8000_0009
    package static let errorBit: UInt32 = 1 << 31
    package static let errPlatform: UInt32 = 0x8000_0004
    package static let errTLSRequired: UInt32 = 0x8000_0005
    package static let errShutdown: UInt32 = 0x8000_0007
    package static let errBlockSizeRequired: UInt32 = 0x8000_0008
}

/// Information items of `NBD_REP_INFO` (`NBD_INFO_*`).
package enum NBDInfo {
    package static let export: UInt16 = 0
    package static let name: UInt16 = 1
    package static let description: UInt16 = 2
    package static let blockSize: UInt16 = 3
}

/// Command types (`NBD_CMD_*`).
package enum NBDCommand {
    package static let read: UInt16 = 0
    package static let write: UInt16 = 1
    package static let disconnect: UInt16 = 2
    package static let flush: UInt16 = 3
    package static let trim: UInt16 = 4
    package static let cache: UInt16 = 5
    package static let writeZeroes: UInt16 = 6
    package static let blockStatus: UInt16 = 7
}

/// Command flags (`NBD_CMD_FLAG_*`).
package enum NBDCommandFlag {
    package static let fua: UInt16 = 1 << 0
    package static let noHole: UInt16 = 1 << 1
    package static let dontFragment: UInt16 = 1 << 2
    package static let reqOne: UInt16 = 1 << 3
}

/// Structured reply chunk types and flags (`NBD_REPLY_*`).
package enum NBDReplyType {
    package static let flagDone: UInt16 = 1 << 0
    package static let none: UInt16 = 0
    package static let offsetData: UInt16 = 1
    package static let offsetHole: UInt16 = 2
    package static let blockStatus: UInt16 = 5
    package static let error: UInt16 = 0x8001
    package static let errorBit: UInt16 = 1 << 15
    package static let errorOffset: UInt16 = 0x8002
}

/// Error values of replies (the protocol fixes them; they happen to match Linux errno).
package enum NBDError {
    package static let ok: UInt32 = 0
    package static let permission: UInt32 = 1  // EPERM
    package static let io: UInt32 = 5  // EIO
    package static let noMemory: UInt32 = 12  // ENOMEM
    package static let invalid: UInt32 = 22  // EINVAL
    package static let noSpace: UInt32 = 28  // ENOSPC
    package static let overflow: UInt32 = 75  // EOVERFLOW
    package static let notSupported: UInt32 = 95  // ENOTSUP
    package static let shutdown: UInt32 = 108  // ESHUTDOWN
}

/// `base:allocation` status bits.
package enum NBDAllocation {
    package static let contextName = "base:allocation"
    /// The id this server gives `base:allocation` in `NBD_REP_META_CONTEXT`.
    package static let contextID: UInt32 = 1
    package static let hole: UInt32 = 1 << 0
    package static let zero: UInt32 = 1 << 1
}

/// QEMU's `qemu:dirty-bitmap:NAME` meta context: one status bit.
package enum NBDDirtyBitmap {
    package static let contextPrefix = "qemu:dirty-bitmap:"
    package static let dirty: UInt32 = 1 << 0
}
