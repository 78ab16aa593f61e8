import CairnCore
import NIOCore
import NIOPosix

/// What every connection of one server shares: the exports, the limits, the I/O threads.
struct NBDServerShared: Sendable {
    var exports: [NBDExport]
    var options: NBDServerOptions
    var pool: NIOThreadPool

    /// The export called `name`; the empty name selects the first (default) export.
    func export(named name: String) -> NBDExport? {
        if name.isEmpty { return exports.first }
        return exports.first { $0.name == name }
    }
}

/// One client connection: the fixed-newstyle handshake, option haggling, then transmission.
///
/// Runs on its channel's event loop only. Block I/O goes to the thread pool; each reply is
/// built whole there and written back on the loop. A request counts as in flight until its
/// reply has been written to the socket; while `maxInFlight` requests are in flight the
/// handler stops asking the channel to read, so a client that never reads its replies cannot
/// make the server buffer more than `maxInFlight` replies.
final class NBDConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// Longest option payload accepted; longer ones close the connection (no real option is
    /// anywhere near this).
    static let maxOptionLength = 64 * 1024

    private enum Phase { case clientFlags, options, transmission, closed }

    /// The export chosen for transmission and what was negotiated for it.
    private struct Session {
        var export: NBDExport
        var size: UInt64
        var structured: Bool
        var blockStatus: Bool
    }

    private let shared: NBDServerShared
    private var phase = Phase.clientFlags
    private var inbound = ByteBuffer()
    private var noZeroes = false
    private var structured = false
    /// The export name `base:allocation` was last selected for (resolved), if any.
    private var metaContextExport: String?
    private var session: Session?
    private var inFlight = 0
    private var readPending = false
    private var disconnecting = false
    private var processing = false
    private var timeout: Scheduled<Void>?

    init(shared: NBDServerShared) {
        self.shared = shared
    }

    // MARK: - Channel events

    func channelActive(context: ChannelHandlerContext) {
        var b = context.channel.allocator.buffer(capacity: 18)
        b.writeInteger(NBDMagic.server)
        b.writeInteger(NBDMagic.option)
        b.writeInteger(NBDHandshakeFlag.fixedNewstyle | NBDHandshakeFlag.noZeroes)
        context.writeAndFlush(wrapOutboundOut(b), promise: nil)
        let nanos = shared.options.negotiationTimeout.components
        let amount = TimeAmount.nanoseconds(nanos.seconds * 1_000_000_000 + nanos.attoseconds / 1_000_000_000)
        timeout = context.eventLoop.assumeIsolated().scheduleTask(in: amount) { [weak self] in
            guard let self, self.phase != .transmission else { return }
            self.closeNow(context)
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        timeout?.cancel()
        timeout = nil
        phase = .closed
        inbound = ByteBuffer()
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        guard phase != .closed else { return }
        if inbound.readableBytes == 0 {
            inbound = bytes
        } else {
            inbound.writeBuffer(&bytes)
        }
        process(context)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        closeNow(context)
    }

    /// Backpressure: no new reads while the connection has its maximum of requests in flight,
    /// or, during negotiation, while option replies the client has not read are piling up.
    func read(context: ChannelHandlerContext) {
        let full = switch phase {
        case .transmission: inFlight >= shared.options.maxInFlight || disconnecting
        case .clientFlags, .options: !context.channel.isWritable
        case .closed: false
        }
        if full {
            readPending = true
        } else {
            context.read()
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable, phase == .options {
            process(context)
            resumeReading(context)
        }
        context.fireChannelWritabilityChanged()
    }

    private func resumeReading(_ context: ChannelHandlerContext) {
        if readPending {
            readPending = false
            context.read()
        }
    }

    // MARK: - Input

    private func process(_ context: ChannelHandlerContext) {
        guard !processing else { return }
        processing = true
        defer {
            processing = false
            compact(context)
        }
        while true {
            switch phase {
            case .closed:
                return
            case .clientFlags:
                guard let flags = inbound.readInteger(as: UInt32.self) else { return }
                guard flags & ~NBDHandshakeFlag.clientKnown == 0 else { return closeNow(context) }
                noZeroes = flags & NBDHandshakeFlag.clientNoZeroes != 0
                phase = .options
            case .options:
                guard context.channel.isWritable else { return }
                let start = inbound.readerIndex
                guard let magic = inbound.getInteger(at: start, as: UInt64.self),
                      let option = inbound.getInteger(at: start + 8, as: UInt32.self),
                      let length = inbound.getInteger(at: start + 12, as: UInt32.self)
                else { return }
                guard magic == NBDMagic.option, length <= Self.maxOptionLength else { return closeNow(context) }
                guard inbound.readableBytes >= 16 + Int(length) else { return }
                inbound.moveReaderIndex(forwardBy: 16)
                guard let payload = inbound.readSlice(length: Int(length)) else { return }
                handleOption(context, option: option, payload: payload)
                context.flush()
            case .transmission:
                if disconnecting {
                    inbound.moveReaderIndex(forwardBy: inbound.readableBytes)
                    return
                }
                guard inFlight < shared.options.maxInFlight else { return }
                let start = inbound.readerIndex
                guard let magic = inbound.getInteger(at: start, as: UInt32.self),
                      let flags = inbound.getInteger(at: start + 4, as: UInt16.self),
                      let type = inbound.getInteger(at: start + 6, as: UInt16.self),
                      let handle = inbound.getInteger(at: start + 8, as: UInt64.self),
                      let offset = inbound.getInteger(at: start + 16, as: UInt64.self),
                      let length = inbound.getInteger(at: start + 24, as: UInt32.self)
                else { return }
                guard magic == NBDMagic.request else { return closeNow(context) }
                let request = NBDRequest(flags: flags, type: type, handle: handle, offset: offset, length: length)
                var payload: ByteBuffer?
                if type == NBDCommand.write {
                    guard Int(length) <= shared.options.maxPayload else {
                        // The payload cannot be buffered: say why, then hang up (the protocol
                        // allows closing when the server cannot consume the data).
                        let reply = errorReply(request, NBDError.overflow, "write of \(length) bytes exceeds the maximum of \(shared.options.maxPayload)", context)
                        phase = .closed
                        context.writeAndFlush(wrapOutboundOut(reply)).assumeIsolated().whenComplete { _ in context.close(promise: nil) }
                        return
                    }
                    guard inbound.readableBytes >= NBDRequest.headerSize + Int(length) else {
                        inbound.reserveCapacity(minimumWritableBytes: NBDRequest.headerSize + Int(length) - inbound.readableBytes)
                        return
                    }
                    inbound.moveReaderIndex(forwardBy: NBDRequest.headerSize)
                    payload = inbound.readSlice(length: Int(length))
                } else {
                    inbound.moveReaderIndex(forwardBy: NBDRequest.headerSize)
                }
                dispatch(context, request, payload: payload)
            }
        }
    }

    /// Drops consumed bytes so the buffer does not grow with the connection's lifetime.
    private func compact(_ context: ChannelHandlerContext) {
        if inbound.readableBytes == 0 {
            inbound = ByteBuffer()
        } else if inbound.readerIndex >= 1 << 20 {
            var fresh = context.channel.allocator.buffer(capacity: inbound.readableBytes)
            fresh.writeBuffer(&inbound)
            inbound = fresh
        }
    }

    private func closeNow(_ context: ChannelHandlerContext) {
        phase = .closed
        timeout?.cancel()
        inbound = ByteBuffer()
        context.close(promise: nil)
    }

    // MARK: - Options

    private func optionReply(_ context: ChannelHandlerContext, option: UInt32, type: UInt32, _ body: (inout ByteBuffer) -> Void = { _ in }) {
        var data = context.channel.allocator.buffer(capacity: 64)
        body(&data)
        var b = context.channel.allocator.buffer(capacity: 20 + data.readableBytes)
        b.writeInteger(NBDMagic.optionReply)
        b.writeInteger(option)
        b.writeInteger(type)
        b.writeInteger(UInt32(data.readableBytes))
        b.writeBuffer(&data)
        context.write(wrapOutboundOut(b), promise: nil)
    }

    private static func writeString(_ s: String, to b: inout ByteBuffer) {
        b.writeInteger(UInt32(s.utf8.count))
        b.writeString(s)
    }

    private func transmissionFlags(_ export: NBDExport) -> UInt16 {
        var flags = NBDTransmissionFlag.hasFlags | NBDTransmissionFlag.sendFlush | NBDTransmissionFlag.sendCache
        if export.writable == nil {
            flags |= NBDTransmissionFlag.readOnly | NBDTransmissionFlag.canMultiConn
        } else {
            flags |= NBDTransmissionFlag.sendFUA | NBDTransmissionFlag.sendWriteZeroes | NBDTransmissionFlag.sendTrim
        }
        if structured { flags |= NBDTransmissionFlag.sendDF }
        return flags
    }

    private func handleOption(_ context: ChannelHandlerContext, option: UInt32, payload: ByteBuffer) {
        var payload = payload
        switch option {
        case NBDOption.exportName:
            let name = payload.readString(length: payload.readableBytes) ?? ""
            guard let export = shared.export(named: name) else { return closeNow(context) }
            var b = context.channel.allocator.buffer(capacity: 134)
            b.writeInteger(export.source.size)
            b.writeInteger(transmissionFlags(export))
            if !noZeroes { b.writeRepeatingByte(0, count: 124) }
            context.write(wrapOutboundOut(b), promise: nil)
            enterTransmission(export)
        case NBDOption.abort:
            optionReply(context, option: option, type: NBDOptionReply.ack)
            phase = .closed
            context.writeAndFlush(wrapOutboundOut(ByteBuffer())).assumeIsolated().whenComplete { _ in context.close(promise: nil) }
        case NBDOption.list:
            guard payload.readableBytes == 0 else { return optionReply(context, option: option, type: NBDOptionReply.errInvalid) }
            for export in shared.exports {
                optionReply(context, option: option, type: NBDOptionReply.server) { b in
                    Self.writeString(export.name, to: &b)
                    b.writeString(export.description)
                }
            }
            optionReply(context, option: option, type: NBDOptionReply.ack)
        case NBDOption.startTLS:
            optionReply(context, option: option, type: NBDOptionReply.errPolicy) { $0.writeString("TLS is not offered by this server") }
        case NBDOption.info, NBDOption.go:
            handleInfo(context, option: option, payload: &payload)
        case NBDOption.structuredReply:
            guard payload.readableBytes == 0 else { return optionReply(context, option: option, type: NBDOptionReply.errInvalid) }
            structured = true
            optionReply(context, option: option, type: NBDOptionReply.ack)
        case NBDOption.listMetaContext, NBDOption.setMetaContext:
            handleMetaContext(context, option: option, payload: &payload)
        default:
            optionReply(context, option: option, type: NBDOptionReply.errUnsupported)
        }
    }

    private func handleInfo(_ context: ChannelHandlerContext, option: UInt32, payload: inout ByteBuffer) {
        guard let nameLength = payload.readInteger(as: UInt32.self), Int(nameLength) <= payload.readableBytes - 2,
              let name = payload.readString(length: Int(nameLength)),
              let count = payload.readInteger(as: UInt16.self), payload.readableBytes == Int(count) * 2
        else { return optionReply(context, option: option, type: NBDOptionReply.errInvalid) }
        var requested: Set<UInt16> = []
        for _ in 0..<count { if let item = payload.readInteger(as: UInt16.self) { requested.insert(item) } }
        guard let export = shared.export(named: name) else {
            return optionReply(context, option: option, type: NBDOptionReply.errUnknown) { $0.writeString("no export named \"\(name)\"") }
        }
        let flags = transmissionFlags(export)
        optionReply(context, option: option, type: NBDOptionReply.info) { b in
            b.writeInteger(NBDInfo.export)
            b.writeInteger(export.source.size)
            b.writeInteger(flags)
        }
        if requested.contains(NBDInfo.name) {
            optionReply(context, option: option, type: NBDOptionReply.info) { b in
                b.writeInteger(NBDInfo.name)
                b.writeString(export.name)
            }
        }
        if requested.contains(NBDInfo.description) {
            optionReply(context, option: option, type: NBDOptionReply.info) { b in
                b.writeInteger(NBDInfo.description)
                b.writeString(export.description)
            }
        }
        let maxPayload = UInt32(shared.options.maxPayload)
        optionReply(context, option: option, type: NBDOptionReply.info) { b in
            b.writeInteger(NBDInfo.blockSize)
            b.writeInteger(UInt32(1))
            b.writeInteger(UInt32(4096))
            b.writeInteger(maxPayload)
        }
        optionReply(context, option: option, type: NBDOptionReply.ack)
        if option == NBDOption.go { enterTransmission(export) }
    }

    private func handleMetaContext(_ context: ChannelHandlerContext, option: UInt32, payload: inout ByteBuffer) {
        let isSet = option == NBDOption.setMetaContext
        if isSet { metaContextExport = nil }
        guard !isSet || structured else {
            return optionReply(context, option: option, type: NBDOptionReply.errInvalid) { $0.writeString("negotiate structured replies first") }
        }
        guard let nameLength = payload.readInteger(as: UInt32.self), Int(nameLength) <= payload.readableBytes,
              let name = payload.readString(length: Int(nameLength)),
              let count = payload.readInteger(as: UInt32.self)
        else { return optionReply(context, option: option, type: NBDOptionReply.errInvalid) }
        var queries: [String] = []
        for _ in 0..<count {
            guard let length = payload.readInteger(as: UInt32.self), Int(length) <= payload.readableBytes,
                  let query = payload.readString(length: Int(length))
            else { return optionReply(context, option: option, type: NBDOptionReply.errInvalid) }
            queries.append(query)
        }
        guard payload.readableBytes == 0 else { return optionReply(context, option: option, type: NBDOptionReply.errInvalid) }
        guard let export = shared.export(named: name) else {
            return optionReply(context, option: option, type: NBDOptionReply.errUnknown) { $0.writeString("no export named \"\(name)\"") }
        }
        let matches: Bool
        if isSet {
            matches = queries.contains(NBDAllocation.contextName)
        } else {
            matches = queries.isEmpty || queries.contains { $0 == "base:" || $0 == NBDAllocation.contextName }
        }
        if matches {
            optionReply(context, option: option, type: NBDOptionReply.metaContext) { b in
                b.writeInteger(isSet ? NBDAllocation.contextID : 0)
                b.writeString(NBDAllocation.contextName)
            }
            if isSet { metaContextExport = export.name }
        }
        optionReply(context, option: option, type: NBDOptionReply.ack)
    }

    private func enterTransmission(_ export: NBDExport) {
        timeout?.cancel()
        timeout = nil
        session = Session(export: export, size: export.source.size, structured: structured,
                          blockStatus: structured && metaContextExport == export.name)
        phase = .transmission
    }

    // MARK: - Transmission

    private func errorReply(_ request: NBDRequest, _ error: UInt32, _ message: String, _ context: ChannelHandlerContext) -> ByteBuffer {
        NBDReplies.error(request.handle, error: error, message: message, structured: session?.structured ?? false,
                         allocator: context.channel.allocator)
    }

    /// Checks a request against the export and the negotiated features; nil if it may run.
    private func validate(_ r: NBDRequest, _ s: Session) -> (UInt32, String)? {
        let writable = s.export.writable != nil
        let allowed: UInt16
        switch r.type {
        case NBDCommand.read: allowed = s.structured ? NBDCommandFlag.dontFragment : 0
        case NBDCommand.write, NBDCommand.trim: allowed = NBDCommandFlag.fua
        case NBDCommand.writeZeroes: allowed = NBDCommandFlag.fua | NBDCommandFlag.noHole
        case NBDCommand.blockStatus: allowed = NBDCommandFlag.reqOne
        case NBDCommand.flush, NBDCommand.cache, NBDCommand.disconnect: allowed = 0
        default: return (NBDError.invalid, "unknown command \(r.type)")
        }
        let isWrite = r.type == NBDCommand.write || r.type == NBDCommand.writeZeroes || r.type == NBDCommand.trim
        if isWrite && !writable { return (NBDError.permission, "export \"\(s.export.name)\" is read-only") }
        if r.flags & ~allowed != 0 { return (NBDError.invalid, "flags 0x\(String(r.flags, radix: 16)) are not valid for command \(r.type)") }
        if r.type == NBDCommand.flush || r.type == NBDCommand.disconnect { return nil }
        let (end, overflow) = r.offset.addingReportingOverflow(UInt64(r.length))
        if overflow || end > s.size {
            let code = (r.type == NBDCommand.write || r.type == NBDCommand.writeZeroes) ? NBDError.noSpace : NBDError.invalid
            return (code, "range \(r.offset)+\(r.length) is past the end of the export (size \(s.size))")
        }
        if r.type == NBDCommand.read && Int(r.length) > shared.options.maxPayload {
            return (NBDError.invalid, "read of \(r.length) bytes exceeds the maximum of \(shared.options.maxPayload)")
        }
        if r.type == NBDCommand.blockStatus {
            if !s.blockStatus { return (NBDError.invalid, "base:allocation was not negotiated") }
            if r.length == 0 { return (NBDError.invalid, "block status of an empty range") }
        }
        return nil
    }

    private func dispatch(_ context: ChannelHandlerContext, _ request: NBDRequest, payload: ByteBuffer?) {
        guard let s = session else { return closeNow(context) }
        if request.type == NBDCommand.disconnect && request.flags == 0 {
            disconnecting = true
            if inFlight == 0 { closeNow(context) }
            return
        }
        inFlight += 1
        if let (code, message) = validate(request, s) {
            return send(context, errorReply(request, code, message, context))
        }
        let allocator = context.channel.allocator
        let source = s.export.source
        let structured = s.structured
        switch request.type {
        case NBDCommand.read:
            runOnPool(context) { NBDReplies.performRead(request, source: source, structured: structured, allocator: allocator) }
        case NBDCommand.blockStatus:
            let maxDescriptors = shared.options.maxBlockStatusDescriptors
            runOnPool(context) {
                NBDReplies.performBlockStatus(request, source: source, maxDescriptors: maxDescriptors, allocator: allocator)
            }
        case NBDCommand.cache:
            runOnPool(context) {
                source.prefetch(request.offset..<request.offset + UInt64(request.length))
                return NBDReplies.simple(request.handle, error: NBDError.ok, allocator: allocator)
            }
        default:
            guard let device = s.export.writable else {
                // FLUSH on a read-only export: nothing to make durable.
                return send(context, NBDReplies.simple(request.handle, error: NBDError.ok, allocator: allocator))
            }
            runOnPool(context) {
                NBDReplies.performWrite(request, payload: payload, device: device, structured: structured, allocator: allocator)
            }
        }
    }

    private func runOnPool(_ context: ChannelHandlerContext, _ work: @escaping @Sendable () -> ByteBuffer) {
        shared.pool.runIfActive(eventLoop: context.eventLoop, work).assumeIsolated().whenComplete { result in
            switch result {
            case .success(let reply): self.send(context, reply)
            case .failure: self.closeNow(context)  // the server is shutting down
            }
        }
    }

    /// Writes a whole reply; the request stops counting as in flight once it is on the wire.
    private func send(_ context: ChannelHandlerContext, _ reply: ByteBuffer) {
        context.writeAndFlush(wrapOutboundOut(reply)).assumeIsolated().whenComplete { _ in
            self.requestFinished(context)
        }
    }

    private func requestFinished(_ context: ChannelHandlerContext) {
        inFlight -= 1
        guard phase == .transmission else { return }
        if disconnecting {
            if inFlight == 0 { closeNow(context) }
            return
        }
        if inFlight < shared.options.maxInFlight {
            process(context)
            resumeReading(context)
        }
    }
}
