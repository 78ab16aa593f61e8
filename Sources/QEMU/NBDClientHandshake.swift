// The NBD client's handshake (fixed newstyle, OPT_GO with block sizes and meta contexts,
// EXPORT_NAME fallback): docs/NBD-CLIENT.md, "What is negotiated". The API is in NBDClient.swift.
import CairnCore
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// What the handshake agreed.
struct NBDNegotiated {
    var size: UInt64 = 0
    var flags: UInt16 = 0
    var structured = false
    var usedGo = false
    var contexts: [(name: String, id: UInt32)] = []
    var limits = NBDBlockLimits()
}

/// The option haggling on a fresh socket, before the reader thread exists.
struct NBDNegotiator {
    let fd: Int32
    let export: String
    let endpoint: NBDEndpoint
    let name: String
    let deadline: Double

    mutating func run(metaContexts: [String]) throws -> NBDNegotiated {
        var r = NBDByteReader(try receive(16, "the greeting"))
        guard r.u64() == NBDMagic.server else {
            throw fail("the server did not greet with NBDMAGIC; it is not an NBD server", code: .io)
        }
        let second = r.u64() ?? 0
        if second == NBDMagic.oldstyle {
            throw CairnError(.unsupported, "the NBD server at \(endpoint) uses oldstyle negotiation, which Cairn does not speak",
                             path: name, hint: "run the server in newstyle mode (qemu-nbd and nbdkit do so by default)")
        }
        guard second == NBDMagic.option else {
            throw fail("the greeting's second word is 0x\(String(second, radix: 16)), not IHAVEOPT", code: .io)
        }
        var fr = NBDByteReader(try receive(2, "the handshake flags"))
        let handshake = fr.u16() ?? 0
        let fixed = handshake & NBDHandshakeFlag.fixedNewstyle != 0
        let noZeroes = handshake & NBDHandshakeFlag.noZeroes != 0
        var clientFlags: [UInt8] = []
        clientFlags.appendBE((fixed ? NBDHandshakeFlag.clientFixedNewstyle : 0) | (noZeroes ? NBDHandshakeFlag.clientNoZeroes : 0))
        try send(clientFlags, "the client flags")

        var result = NBDNegotiated()
        guard fixed else {
            // Plain newstyle: NBD_OPT_EXPORT_NAME is the only option there is.
            try exportName(into: &result, noZeroes: noZeroes)
            return result
        }
        result.structured = try simpleOption(NBDOption.structuredReply, "NBD_OPT_STRUCTURED_REPLY")
        if result.structured && !metaContexts.isEmpty {
            result.contexts = try setMetaContexts(metaContexts)
        }
        if try go(into: &result) { return result }
        try exportName(into: &result, noZeroes: noZeroes)
        return result
    }

    /// An option without data whose answer is ACK or an error; true on ACK.
    private func simpleOption(_ option: UInt32, _ label: String) throws -> Bool {
        try send(NBDEncode.option(option), label)
        while true {
            let (header, _) = try optionReply(option, label)
            if header.type == NBDOptionReply.ack { return true }
            if header.isError {
                if header.type == NBDOptionReply.errTLSRequired { throw tlsRequired() }
                return false
            }
            // Informational replies the client does not expect are skipped.
        }
    }

    private func setMetaContexts(_ wanted: [String]) throws -> [(name: String, id: UInt32)] {
        var queries: [String] = []
        for q in wanted where !queries.contains(q) { queries.append(q) }
        try send(NBDEncode.option(NBDOption.setMetaContext, NBDEncode.metaContextData(export: export, queries: queries)),
                 "NBD_OPT_SET_META_CONTEXT")
        var found: [String: UInt32] = [:]
        while true {
            let (header, payload) = try optionReply(NBDOption.setMetaContext, "NBD_OPT_SET_META_CONTEXT")
            if header.type == NBDOptionReply.metaContext {
                var r = NBDByteReader(payload)
                guard let id = r.u32(), let context = r.string(r.remaining) else {
                    throw fail("an NBD_REP_META_CONTEXT reply of \(payload.count) bytes", code: .io)
                }
                if queries.contains(context), found[context] == nil, !found.values.contains(id) { found[context] = id }
                continue
            }
            if header.type == NBDOptionReply.ack { break }
            if header.isError {
                if header.type == NBDOptionReply.errTLSRequired { throw tlsRequired() }
                return []  // the server knows none of them (or the option): nothing negotiated
            }
        }
        return queries.compactMap { q in found[q].map { (q, $0) } }
    }

    /// NBD_OPT_GO; false when the server does not know it (then EXPORT_NAME is used).
    private func go(into result: inout NBDNegotiated) throws -> Bool {
        try send(NBDEncode.option(NBDOption.go, NBDEncode.goData(export: export, items: [NBDInfo.blockSize])), "NBD_OPT_GO")
        var haveExport = false
        while true {
            let (header, payload) = try optionReply(NBDOption.go, "NBD_OPT_GO")
            switch header.type {
            case NBDOptionReply.info:
                switch NBDInfoItem.decode(payload) {
                case .failure(let v): throw fail(v.message, code: .io)
                case .success(.export(let size, let flags)):
                    result.size = size
                    result.flags = flags
                    haveExport = true
                case .success(.blockSize(let minimum, let preferred, let maximum)):
                    result.limits = NBDBlockLimits(minimum: minimum, preferred: preferred, maximum: maximum)
                case .success(.other):
                    break
                }
            case NBDOptionReply.ack:
                guard haveExport else { throw fail("NBD_OPT_GO succeeded without NBD_INFO_EXPORT (no size)", code: .io) }
                result.usedGo = true
                return true
            case NBDOptionReply.errUnsupported:
                return false
            case NBDOptionReply.errUnknown:
                throw unknownExport(message: text(payload))
            case NBDOptionReply.errTLSRequired:
                throw tlsRequired()
            default:
                if header.isError {
                    let message = text(payload)
                    throw CairnError(.io, "the NBD server at \(endpoint) refused export \"\(export)\": \(NBDWire.optionReplyName(header.type))"
                                     + (message.isEmpty ? "" : ": \(message)"), path: name,
                                     hint: header.type == NBDOptionReply.errShutdown ? "the server is shutting down; connect again later" : "see the server's log")
                }
                // Other informational replies are skipped.
            }
        }
    }

    private func exportName(into result: inout NBDNegotiated, noZeroes: Bool) throws {
        try send(NBDEncode.option(NBDOption.exportName, Array(export.utf8)), "NBD_OPT_EXPORT_NAME")
        let reply: [UInt8]
        do {
            reply = try receive(noZeroes ? 10 : 134, "the reply to NBD_OPT_EXPORT_NAME")
        } catch let e as CairnError where e.message.contains("closed the connection") {
            // The option cannot report errors: a server without the export just hangs up.
            throw CairnError(.notFound, "the NBD server at \(endpoint) closed the connection when asked for export \"\(export)\"",
                             path: name, hint: "the export probably does not exist; check its name (qemu-nbd -x, nbdkit -e)")
        }
        var r = NBDByteReader(reply)
        result.size = r.u64() ?? 0
        result.flags = r.u16() ?? 0
        result.usedGo = false
    }

    private func unknownExport(message: String) -> CairnError {
        var hint = "check the export name"
        if let names = try? listExports(), !names.isEmpty {
            hint += "; the server offers: " + names.prefix(20).map { "\"\($0)\"" }.joined(separator: ", ")
        }
        try? send(NBDEncode.option(NBDOption.abort), "NBD_OPT_ABORT")
        return CairnError(.notFound, "the NBD server at \(endpoint) has no export \"\(export)\"" + (message.isEmpty ? "" : " (\(message))"),
                          path: name, hint: hint)
    }

    private func listExports() throws -> [String] {
        try send(NBDEncode.option(NBDOption.list), "NBD_OPT_LIST")
        var names: [String] = []
        while true {
            let (header, payload) = try optionReply(NBDOption.list, "NBD_OPT_LIST")
            if header.type == NBDOptionReply.server {
                var r = NBDByteReader(payload)
                if let n = r.u32(), let s = r.string(Int(min(n, UInt32(NBDWire.maxString)))) { names.append(s) }
                continue
            }
            return names  // ACK or an error ends the list
        }
    }

    private func tlsRequired() -> CairnError {
        CairnError(.unsupported, "the NBD server at \(endpoint) requires TLS, which Cairn's NBD client does not speak", path: name,
                   hint: "export the disk without TLS on a unix socket or a trusted network")
    }

    private func optionReply(_ option: UInt32, _ label: String) throws -> (NBDOptionReplyHeader, [UInt8]) {
        let head = try receive(NBDWire.optionReplyHeaderSize, "the reply to \(label)")
        switch NBDOptionReplyHeader.decode(head, expecting: option) {
        case .failure(let v):
            throw fail("\(v.message) (in the reply to \(label))", code: .io)
        case .success(let header):
            let payload = header.length == 0 ? [] : try receive(Int(header.length), "the reply to \(label)")
            return (header, payload)
        }
    }

    private func text(_ payload: [UInt8]) -> String {
        String(decoding: payload.prefix(500), as: UTF8.self)
    }

    private func fail(_ message: String, code: CairnError.Code) -> CairnError {
        CairnError(code, "NBD handshake with \(endpoint) for export \"\(export)\" failed: \(message)", path: name,
                   hint: "check that the endpoint is an NBD server (qemu-nbd, qemu-storage-daemon, nbdkit)")
    }

    private func send(_ bytes: [UInt8], _ label: String) throws {
        let failure = bytes.withUnsafeBytes { NBDSocket.send(fd, $0, deadline: deadline) }
        if let failure { throw fail("sending \(label): \(failure.reason)", code: .io) }
    }

    private func receive(_ count: Int, _ label: String) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        let fd = self.fd, deadline = self.deadline
        var failure: NBDSocketFailure?
        out.withUnsafeMutableBytes { buf in
            do throws(NBDSocketFailure) {
                try NBDSocket.receive(fd, into: buf) { () throws(NBDSocketFailure) in
                    if !NBDSocket.waitFor(fd, events: Int16(POLLIN), until: deadline) {
                        throw .timedOut("no answer within the connect timeout")
                    }
                }
            } catch {
                failure = error
            }
        }
        if let failure { throw fail("waiting for \(label): \(failure.reason)", code: .io) }
        return out
    }
}
