// The API key a viewer typed in (asked for only after a 401), kept for this tab's session
// and shared by the page and the dashboard.

const API_KEY_STORAGE = "chorus.apiKey";

export function storedApiKey() {
  try {
    return window.sessionStorage.getItem(API_KEY_STORAGE) ?? "";
  } catch {
    return "";  // storage disabled
  }
}

export function storeApiKey(key) {
  try {
    if (key) window.sessionStorage.setItem(API_KEY_STORAGE, key);
    else window.sessionStorage.removeItem(API_KEY_STORAGE);
  } catch {
    // Storage disabled: the key lasts as long as the page, and the server will ask again.
  }
}
