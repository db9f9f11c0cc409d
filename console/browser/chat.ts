/// <reference lib="dom" />
/**
 * The chat page, in the browser. The prompt is sealed here, to keys the
 * AppView confirms, by the same client the SDK uses; the console receives
 * ciphertext and relays ciphertext back, and the reply is opened here.
 */
import { CocoreClient, type ChatMessage } from '../../src/client/index.ts'

const root = document.getElementById('chat') as HTMLElement
const form = root.querySelector('form') as HTMLFormElement
const modelSelect = form.querySelector('select[name=model]') as HTMLSelectElement
const input = form.querySelector('textarea[name=prompt]') as HTMLTextAreaElement
const log = root.querySelector('#transcript') as HTMLElement
const status = root.querySelector('#status') as HTMLElement
const client = new CocoreClient({ consoleUrl: '', appviewUrl: root.dataset.appview ?? '' })
const history: ChatMessage[] = []

async function loadModels(): Promise<void> {
  const res = await fetch('/exchange/providers')
  const { providers } = (await res.json()) as { providers: { models: string[] }[] }
  const models = [...new Set(providers.flatMap((p) => p.models))].sort()
  modelSelect.replaceChildren(...models.map((m) => new Option(m, m)))
  status.textContent = models.length ? `${providers.length} provider(s) connected` : 'No provider is connected right now.'
}

function bubble(role: string, text: string): HTMLElement {
  const p = document.createElement('p')
  p.className = `msg ${role}`
  p.dataset.role = role
  p.textContent = text
  log.append(p)
  return p
}

form.addEventListener('submit', (ev) => {
  ev.preventDefault()
  const content = input.value.trim()
  if (!content || !modelSelect.value) return
  input.value = ''
  history.push({ role: 'user', content })
  bubble('user', content)
  const reply = bubble('assistant', '')
  status.textContent = 'Sealing and sending…'
  void (async () => {
    let text = ''
    try {
      for await (const e of client.chat({ model: modelSelect.value, messages: history, maxTokens: 256 })) {
        if (e.type === 'meta') status.textContent = `Answered by ${e.providerDid}`
        else if (e.type === 'text') reply.textContent = text += e.text
        else {
          status.textContent = `Done: ${e.tokensIn} tokens in, ${e.tokensOut} out. Receipt: ${e.receiptUri ?? 'none'}`
          root.dataset.receipt = e.receiptUri ?? ''
        }
      }
      history.push({ role: 'assistant', content: text })
      root.dataset.state = 'done'
    } catch (err) {
      status.textContent = `Error: ${(err as Error).message}`
      root.dataset.state = 'error'
    }
  })()
})

void loadModels()
